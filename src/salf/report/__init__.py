"""Reports: plots and Markdown."""
