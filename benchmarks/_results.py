"""Where a benchmark writes its JSON: one file per configuration, named by the configuration.

    benchmarks/results/<script>[_<part>...].json

A bare run of a script (`python benchmarks/X.py` on a CPU machine) writes `X.json`, except that
the scripts that measure one precision at a time always name it (`train_fp32.json`,
`train_bf16.json`, `blocksparse_fp32.json`). Every option that changes *what* is measured (preset,
precision, device, the set of configurations compared, the method) adds its value to the name when
it differs from a bare run's, so a run of one configuration never overwrites another's file.
Sizes that only change how long a measurement runs (steps, repeats, batch, threads) are recorded
in the JSON and are not part of the name: a rerun with other sizes replaces the figure of its own
configuration. `--out FILE` still writes exactly FILE.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def slug(value: object) -> str:
    """A file-name-safe spelling of a configuration value."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", str(value)).strip("-") or "x"


def unless(value: object, default: object) -> str | None:
    """The value as a name part when it differs from the bare run's default, else None."""
    return None if value == default else slug(value)


def listed(values: Iterable[object], default: Iterable[object]) -> str | None:
    """A list option (the configurations a run compares) as a name part, when it is not the
    default list: members joined by '+'."""
    values, default = [str(v) for v in values], [str(v) for v in default]
    return None if values == default else "+".join(slug(v) for v in values)


def result_path(script: str, *parts: str | None) -> Path:
    """benchmarks/results/<script>_<parts>.json; None parts (defaults) are left out."""
    return RESULTS / ("_".join([script, *(p for p in parts if p)]) + ".json")


def out_path(out: str | None, script: str, *parts: str | None) -> Path:
    """--out when given, else the configuration's own file."""
    return Path(out) if out else result_path(script, *parts)


def write_result(out: Path, result: dict, script: str, argv: list[str], threads: int) -> Path:
    """Record how the figures were made (the command line and thread count) and write the JSON."""
    import json

    result["command"] = " ".join(["python", f"benchmarks/{script}.py", *argv])
    result["threads"] = threads
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return out
