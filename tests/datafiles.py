"""Small labelled files the CLI tests read (one writer, so every test sees the same format)."""


def reviews_csv(folder, n: int = 40):
    """folder/reviews.csv: `review,label` rows, alternating negative / positive, n of them."""
    path = folder / "reviews.csv"
    rows = [f"{'a good warm film' if i % 2 else 'a bad dull film'} number {i},"
            f"{'positive' if i % 2 else 'negative'}" for i in range(n)]
    path.write_text("review,label\n" + "\n".join(rows) + "\n")
    return path
