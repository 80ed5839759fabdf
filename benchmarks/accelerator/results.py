"""Results that survive a cut: atomic JSON files rewritten after every row, the time budget with
each row's estimate, and the merge of whatever the workers left into one JSON and one table."""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import time
from typing import Optional

from benchmarks.accelerator import workload as wl


def write_json(path, data) -> None:
  """Write `data` to `path` atomically: a reader (or a run killed mid-write) sees the old file
  or the new one, never half of one."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_text(json.dumps(data, indent=1, default=str))
  os.replace(tmp, path)


def read_json(path) -> Optional[dict]:
  path = pathlib.Path(path)
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


class RowFile:
  """A worker's JSON: {"meta": {...}, "rows": {row id: figures}, "skipped": {row id: reason},
  "failed": {row id: reason}}, rewritten atomically after every change. Several processes of one
  side (one per row) add to the same file one after another."""

  def __init__(self, path, meta: Optional[dict] = None):
    self.path = pathlib.Path(path)
    self.data = read_json(self.path) or {"meta": {}, "rows": {}, "skipped": {}, "failed": {}}
    self.data["meta"].update(meta or {})
    self.save()

  def save(self):
    write_json(self.path, self.data)

  def meta(self, **kw):
    self.data["meta"].update(kw)
    self.save()

  def row(self, row_id: str, figures: dict):
    self.data["rows"][row_id] = figures
    self.save()

  def skip(self, row_id: str, reason: str):
    self.data["skipped"][row_id] = reason
    self.save()

  def fail(self, row_id: str, reason: str):
    self.data["failed"][row_id] = reason
    self.save()


class Budget:
  """Seconds left until `deadline` (time.time(), the same in every process), and whether a row
  fits: its prior estimate times how long this side's finished rows took against theirs."""

  def __init__(self, deadline: float, w: wl.Workload):
    self.deadline, self.w, self.ratios = deadline, w, {}

  def left(self) -> float:
    return self.deadline - time.time()

  def scale(self, row: str) -> float:
    """Median of actual / estimated seconds over the side's finished rows, within [0.25, 4]
    (1 before any): a warm compilation cache or a slower machine moves every later estimate."""
    mine = self.ratios.get(row.split("/")[0], [])
    return min(4.0, max(0.25, statistics.median(mine))) if mine else 1.0

  def expected(self, row: str, extra: float = 0.0) -> float:
    return (self.w.estimate(row) + extra) * self.scale(row)

  def why_not(self, row: str, extra: float = 0.0) -> Optional[str]:
    """None if the row is expected to finish before the deadline, else the reason to skip it."""
    need, left = self.expected(row, extra), self.left()
    if need <= left:
      return None
    return f"budget: expected {need:.0f} s, {max(left, 0.0):.0f} s left"

  def finished(self, row: str, seconds: float, extra: float = 0.0):
    est = self.w.estimate(row) + extra
    if est > 0:
      self.ratios.setdefault(row.split("/")[0], []).append(seconds / est)


def _ratio(num, den):
  return None if num is None or den is None or not den else num / den


def device_figures(pre: dict, hbm_tb_s: Optional[float], peak_tflops: Optional[float]) -> dict:
  """Datasheet bandwidth / peak (by device name, or the flags) beside the ones measured in the
  same run by the preflight (a device-to-device copy, a bf16 matmul)."""
  kind = pre.get("device_kind", "unknown")
  return {
    "kind": kind,
    "platform": pre.get("platform"),
    "hbm_tb_s": hbm_tb_s if hbm_tb_s is not None else wl.lookup(wl.HBM_TB_S, kind),
    "peak_bf16_tflops": peak_tflops if peak_tflops is not None else wl.lookup(wl.PEAK_TFLOPS, kind),
    "measured_copy_tb_s": pre.get("copy_tb_s"),
    "measured_matmul_bf16_tflops": pre.get("matmul_tflops"),
  }


def _decode_figures(w: wl.Workload, side: str, row: dict, dev: dict) -> dict:
  """Roofline fractions of a decode row. Each kernel is held to its own floor: ours reads every
  one of the cache's P' + N slots each step (masked), torch's growing cache only the valid ones
  (P + N / 2 on average); the ideal floor (valid slots only) is given for both."""
  c, b = w.config, row["batch"]
  valid = w.sampler_prompt + w.sampler_new / 2
  slots = w.cache_slots if side == "ours" else valid
  own = wl.decode_step_bytes(c, b, slots, w.lora_rank)
  ideal = wl.decode_step_bytes(c, b, valid, w.lora_rank)
  steps = row["decode_steps_s"]
  frac = lambda tb_s, nbytes: None if not tb_s else steps * nbytes / (tb_s * 1e12)  # noqa: E731
  return {
    "kernel_cache_slots": slots,
    "decode_step_bytes": own,
    "ideal_step_bytes": ideal,
    "roofline_steps_s": None if not dev["hbm_tb_s"] else dev["hbm_tb_s"] * 1e12 / own,
    "hbm_roofline_fraction": frac(dev["hbm_tb_s"], own),
    "measured_bw_roofline_fraction": frac(dev["measured_copy_tb_s"], own),
    "ideal_roofline_fraction": frac(dev["hbm_tb_s"], ideal),
  }


def _step_figures(w: wl.Workload, side: str, row: dict, dev: dict) -> dict:
  """Update MFU on useful work (each prompt once per question) against the datasheet peak and
  the matmul peak measured in this run; for torch also the work it executes (the prompt once
  per CoT row)."""
  q, c = row["questions"], w.config
  useful = wl.update_model_flops(c, w, q)
  out = {"update_model_flops": useful, "update_tflop_s": useful / row["update_s"] / 1e12}
  out["update_mfu"] = _ratio(out["update_tflop_s"], dev["peak_bf16_tflops"])
  out["update_mfu_vs_measured_matmul"] = _ratio(
    out["update_tflop_s"], dev["measured_matmul_bf16_tflops"]
  )
  if side == "torch":
    executed = wl.update_model_flops(c, w, q, prompt_per_row=True)
    out["update_executed_model_flops"] = executed
    out["update_executed_mfu"] = _ratio(executed / row["update_s"] / 1e12, dev["peak_bf16_tflops"])
  return out


DEFINITIONS = {
  "decode_tok_s": "B * (N - 1) / (t[N new tokens] - t[1 new token])",
  "prefill_tok_s": "B * P / t[1 new token]",
  "tok_s": "B * N / t[N new tokens]",
  "hbm_roofline_fraction": "decode steps/s / (datasheet HBM bandwidth / bytes the kernel "
  "reads per step: weights a step reads (not the embedding table; fp32 LoRA) + B * "
  "kernel_cache_slots * 2*L*Hkv*Dh*2)",
  "measured_bw_roofline_fraction": "the same against the copy bandwidth measured this run",
  "ideal_roofline_fraction": "the same with only the valid slots (P + N/2 on average)",
  "cot_tok_s": "Q * G * K sampled CoT tokens / step time",
  "update_mfu": "useful model FLOPs of the update (each prompt once per question, remat not "
  "counted) / update time / datasheet dense bf16 peak; for torch this is useful work only: "
  "it runs the prompt once per CoT row (update_executed_mfu counts that)",
  "update_mfu_vs_measured_matmul": "the same against the bf16 matmul peak measured this run",
  "peak_device_bytes": "the row's own peak (its own process for ours; reset before the row "
  "for torch); None on CPU",
  "ratios.decode": "ours / torch throughput",
  "ratios.step": "torch / ours time",
}


def merge(w: wl.Workload, parts: dict, dev: dict, order: list, skipped: dict) -> dict:
  """One result from the workers' files (`parts`: side -> RowFile data or None) and the
  driver's own skipped rows: every row of `order` ends in `rows`, `skipped` or `failed`."""
  rows, failed, skip = {}, {}, dict(skipped)
  for side, data in parts.items():
    data = data or {}
    for rid, row in data.get("rows", {}).items():
      kind = rid.split("/")[1]
      extra = (
        _decode_figures(w, side, row, dev) if kind == "decode" else _step_figures(w, side, row, dev)
      )
      rows[rid] = {**row, **extra}
    failed.update(data.get("failed", {}))
    skip.update(data.get("skipped", {}))
  for rid in order:
    if rid not in rows and rid not in failed and rid not in skip:
      skip[rid] = "not reached: the run ended before this row"
  ratios = {}
  for rid in order:
    side, kind, size = rid.split("/")
    o, t = rows.get(f"ours/{kind}/{size}"), rows.get(f"torch/{kind}/{size}")
    if side != "ours" or not o or not t:
      continue
    keys = (
      ("decode_tok_s", "prefill_tok_s", "tok_s")
      if kind == "decode"
      else ("step_s", "sample_s", "score_s", "update_s")
    )
    ratios[f"{kind}/{size}"] = {
      k: _ratio(o[k], t[k]) if kind == "decode" else _ratio(t[k], o[k]) for k in keys
    }
  return {
    "order": order,
    "rows": {r: rows[r] for r in order if r in rows},
    "skipped": [{"row": r, "reason": skip[r]} for r in order if r in skip and r not in rows],
    "failed": [{"row": r, "reason": failed[r]} for r in order if r in failed],
    "ratios": ratios,
    "device": dev,
    "definitions": DEFINITIONS,
  }


def _fmt(x, spec=".1f", none="-"):
  return none if x is None else format(x, spec)


def _pct(x):
  return "-" if x is None else f"{100 * x:.0f}%"


def table(result: dict) -> str:
  """The merged result as text: device and versions, one line per finished row, then the
  skipped and failed rows with their reasons."""
  dev, att = result["device"], result.get("attention", {})
  lines = [
    f"{result['workload']['name']} on {dev['kind']}: HBM datasheet {dev['hbm_tb_s']} TB/s"
    f", measured copy {_fmt(dev['measured_copy_tb_s'], '.3g')} TB/s; bf16 peak datasheet "
    f"{dev['peak_bf16_tflops']} TFLOP/s, measured matmul "
    f"{_fmt(dev['measured_matmul_bf16_tflops'], '.3g')} TFLOP/s",
    f"attention: requested {att.get('requested')}, ran {att.get('used')}"
    + (f" ({att['reason']})" if att.get("reason") else ""),
    "",
    "decode          | tok/s    | prefill tok/s | % roofline (own floor / measured bw / "
    "ideal) | peak GB | ours/torch",
  ]
  for rid, r in result["rows"].items():
    if "/decode/" not in rid:
      continue
    ratio = result["ratios"].get("decode/" + rid.split("/")[2], {}).get("decode_tok_s")
    peak = r.get("peak_device_bytes")
    lines.append(
      f"{rid:<16}| {r['decode_tok_s']:8.1f} | {r['prefill_tok_s']:13.1f} | "
      f"{_pct(r['hbm_roofline_fraction'])} / {_pct(r['measured_bw_roofline_fraction'])} / "
      f"{_pct(r['ideal_roofline_fraction'])} | {_fmt(peak and peak / 1e9, '.2f')} | "
      f"{_fmt(ratio if rid.startswith('ours') else None, '.2f')}"
    )
  lines += [
    "",
    "step          | step s | sample s | score s | update s | update MFU (datasheet / "
    "measured matmul) | peak GB | torch/ours step",
  ]
  for rid, r in result["rows"].items():
    if "/step/" not in rid:
      continue
    ratio = result["ratios"].get("step/" + rid.split("/")[2], {}).get("step_s")
    peak = r.get("peak_device_bytes")
    lines.append(
      f"{rid:<14}| {r['step_s']:6.3f} | {r['sample_s']:8.3f} | {r['score_s']:7.3f} | "
      f"{r['update_s']:8.3f} | {_pct(r['update_mfu'])} / "
      f"{_pct(r['update_mfu_vs_measured_matmul'])}"
      + (" (useful work)" if rid.startswith("torch") else "")
      + f" | {_fmt(peak and peak / 1e9, '.2f')} | "
      f"{_fmt(ratio if rid.startswith('ours') else None, '.2f')}"
    )
  for key in ("skipped", "failed"):
    if result[key]:
      lines += ["", f"{key}:"] + [f"  {s['row']}: {s['reason']}" for s in result[key]]
  return "\n".join(lines)
