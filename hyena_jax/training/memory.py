"""What a compiled program needs per device, from XLA's memory analysis: the one memory report
of the deviceless compiles (`aot`) and of the context-parallel plans (`context_parallel`)."""

from __future__ import annotations

from typing import Any

GIB = 2.0 ** 30


def memory_report(compiled: Any) -> dict[str, int]:
  """Bytes per device: argument, output, temp, alias, code, and `peak` = argument + output +
  temp - alias (what must fit on one device). {} when the backend reports nothing."""
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  report = {"argument_bytes": int(stats.argument_size_in_bytes),
            "output_bytes": int(stats.output_size_in_bytes),
            "temp_bytes": int(stats.temp_size_in_bytes),
            "alias_bytes": int(stats.alias_size_in_bytes),
            "code_bytes": int(stats.generated_code_size_in_bytes)}
  report["peak_bytes"] = (report["argument_bytes"] + report["output_bytes"] +
                          report["temp_bytes"] - report["alias_bytes"])
  return report


def in_gib(report: dict[str, int]) -> dict[str, float]:
  """`memory_report` with every `<name>_bytes` as `<name>_gib`, rounded to 1 MiB or so."""
  return {key[:-len("_bytes")] + "_gib": round(value / GIB, 3) for key, value in report.items()}
