"""Markdown reports: the analysis (per-layer table + reasoning) and shared table helpers."""

from __future__ import annotations

from pathlib import Path

from ..io import atomic_write_text


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_analysis_report(path: Path, tr, plan, choice: dict, cost: dict, fit: dict) -> Path:
    """report.md: what was analysed, the cut and why, the per-space table, fit quality."""
    from ..analysis import inference_gains

    gains = inference_gains(tr)
    cuts = cost["cuts"]
    k = plan.eof
    curve = choice["curve"]
    pred = cuts[k]
    lines = [
        f"# salf analysis: {tr.model.get('spec')} on {tr.data.get('dataset')}",
        "",
        f"- model: `{tr.model.get('name_or_path')}` ({tr.model.get('model_type')}, "
        f"{tr.num_layers} layers, weights hash `{tr.model.get('weights_hash')}`)",
        f"- data: {tr.data.get('dataset')} / {tr.data.get('split')}, {tr.data.get('samples')} examples "
        f"(sample hash `{tr.data.get('sample_hash')}`), task {tr.task}",
        f"- analysis time: {fmt(tr.timing.get('seconds'), 1)} s",
        "",
        "## The cut",
        "",
        f"**{plan.describe()}** — policy `{plan.policy}`: {choice['reason']}.",
        "",
        f"Predicted for training (batch {cost['settings']['batch_size']} x "
        f"{cost['settings']['seq_len']} tokens): {fmt(pred['flops_ratio'], 2)}x the FLOPs, "
        f"{fmt(pred['memory_ratio'], 2)}x the peak memory and {fmt(pred['step_time_ratio'], 2)}x "
        "the step time of full fine-tuning.",
        "",
        f"Benefit model: source `{curve['source']}` (α = {fmt(curve['alpha'])}, E = {fmt(curve['E'])})"
        + (f"; **fallback** from the depth fit: {curve['fallback_reason']}" if curve.get("fallback")
           else "")
        + f". Depth-law fit R² = {fmt(fit.get('r2'))} ({'ok' if fit.get('ok') else 'rejected'}).",
        "",
        "![trace](trace.png)",
        "",
        "## Per latent space",
        "",
        "Space 0 is the embedding output; space l is the output of decoder layer l. "
        "Gain Δ_l = D_{l-1} - D_l. Cost/benefit columns describe the cut eof = l "
        "(embeddings + layers 1..l frozen).",
        "",
    ]
    header = ["space", "deviation D", "gain Δ", "label CE", "lens acc", "margin AUC",
              "benefit B(l)", "FLOPs ratio", "memory ratio"]
    rows = []
    for s in tr.spaces:
        l = s["space"]
        rows.append([l, s.get("deviation"), gains[l - 1] if l >= 1 else None, s.get("label_ce"),
                     s.get("lens_acc"), s.get("margin_auc"),
                     curve["benefit"][l] if l < len(curve["benefit"]) else None,
                     cuts[l]["flops_ratio"] if l < len(cuts) else None,
                     cuts[l]["memory_ratio"] if l < len(cuts) else None])
    lines.append(md_table(header, rows))
    lines += ["", "Every other policy can be applied to this trace without the model: "
              "`salf plan --trace trace.json --policy paper|onset|knee|budget=B`.", ""]
    path = Path(path)
    atomic_write_text(path, "\n".join(lines))
    return path
