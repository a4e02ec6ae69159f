"""What `calibrate.py` does, as a library function."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from triattention_jax.calibration import calibrate
from triattention_jax.checkpoint import load_model
from triattention_jax.prompts import check_writable
from triattention_jax.stats import STATS_FILE, save_stats

REPORT_SEQUENCE_TOKENS = 1024


def run_calibration(
    *,
    model: str,
    calib_files: Sequence[str],
    num_tokens: int,
    seq_len: int,
    batch_size: int,
    dtype: str,
    out: str | None,
    report: bool,
    report_dir: str | None,
) -> list[str]:
    """Calibrates, writes the statistics (and the report); returns summary lines to print."""
    if out:
        check_writable(out)
    loaded = load_model(model, dtype=dtype)
    calibration = calibrate(loaded, calib_files=calib_files, num_tokens=num_tokens, seq_len=seq_len, batch_size=batch_size)
    result, moments, sequences = calibration.result, calibration.moments, calibration.sequences
    target = Path(out) if out else loaded.store_dir / STATS_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    save_stats(target, result)
    r_head, _ = moments.resultant_lengths()
    lines = [
        f"statistics: {target} ({result.num_tokens} tokens; {result.metadata['source']})",
        f"heads with R > 0.95: {(r_head > 0.95).mean():.1%}, R > 0.90: {(r_head > 0.90).mean():.1%}",
    ]
    if report:
        from triattention_jax.concentration import concentration_report, write_report

        sequence = max(sequences, key=len)[:REPORT_SEQUENCE_TOKENS]
        numbers = concentration_report(loaded.transformer, moments, sequence)
        folder = Path(report_dir) if report_dir else loaded.store_dir / "report"
        paths = write_report(numbers, folder)
        lines.append(
            f"reconstruction Pearson r over {len(sequence)} tokens: mean {numbers['reconstruction']['pearson_mean']:.3f}, "
            f"median {numbers['reconstruction']['pearson_median']:.3f}"
        )
        norms = numbers["key_norm_vs_attention"]
        lines.append(f"key norm vs attention received, Spearman: median {norms['spearman_median']:.3f}, negative in "
                     f"{norms['fraction_negative']:.0%} of KV heads")
        lines.append("report: " + ", ".join(str(p) for p in paths))
    return lines
