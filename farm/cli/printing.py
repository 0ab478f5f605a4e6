"""What the subcommands print: aligned tables and the one-row perplexity report (or its JSON form)."""

from __future__ import annotations

import json
import sys


def print_table(rows: list[dict], columns: list[str], out=None) -> None:
    out = out or sys.stdout
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)), file=out)


def metrics_row(label: dict, ppl) -> dict:
    return {**label, "ppl": f"{ppl.ppl:.3f}", "windows": ppl.windows, "seqlen": ppl.seqlen,
            "tokens/s": f"{ppl.tokens_per_s:.0f}", "eval_s": f"{ppl.seconds:.1f}"}


def report(label: dict, ppl, as_json: bool, extra: dict | None = None) -> None:
    if as_json:
        print(json.dumps({**label, **(extra or {}), "perplexity": ppl.to_dict()}, sort_keys=True))
    else:
        print_table([metrics_row(label, ppl)], list(label) + ["ppl", "windows", "seqlen", "tokens/s", "eval_s"])
