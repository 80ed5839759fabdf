"""The memory plan as text: what `python -m markovian_jax.plan` prints and training logs."""

from __future__ import annotations

from markovian_jax.planning.memory import GIB
from markovian_jax.runtime import sharding


def _gib(x: int) -> str:
  return f"{x / GIB:7.2f}"


def describe(p) -> str:
  """Text of a `plan.Plan` (one item per line, GiB per device)."""
  s, c, w, m = p.spec, p.model, p.workload, p.memory
  d, f, t = p.mesh
  where = f" [mesh.preset={s.mesh.preset}]" if s.mesh.preset else ""
  split = d * f
  real = w.rows + (w.questions if w.reference_rows else 0)
  padded = sharding.pad_rows(real, p.mesh, sharding.DECODE_RULES)
  extra = f" ({w.rows} + {w.questions} CoT')" if w.reference_rows else ""
  lines = [
    f"plan      {s.task} on mesh (data {d}, fsdp {f}, tensor {t}) = {d * f * t} devices{where}",
    f"model     {s.model.path}: {c.model_type}, {c.num_params / 1e9:.2f} B params, "
    f"{c.param_dtype}, "
    f"remat={w.remat} ({p.model_source})",
    f"rows      Q={w.questions} x G={w.group} = {w.rows}, {w.rows // split} per data x fsdp "
    f"shard (score, update); sampler {real} rows{extra} padded to {padded}, "
    f"{padded // d} per data shard",
    f"lengths   prompt {p.prompt_source}; CoT {w.cot}; answer rows {w.answer}; "
    f"logprob chunk {w.chunk}",
    f"{'per device':44s}    GiB",
  ]
  for item in m.items:
    label = f"  {item.phase if item.phase != 'persistent' else '':8s}{item.name}"
    note = item.note
    if item.name.startswith("saved activations"):
      others = ", ".join(
        f"{k} {v / GIB:.2f}" for k, v in m.activations_by_remat.items() if k != w.remat
      )
      note = f"{note}; remat {others}"
    lines.append(f"{label:44s}{_gib(item.bytes)}   {note}".rstrip())
  phases = {ph: m.total(ph) for ph in ("sample", "score", "update")}
  rest = ", ".join(f"{k} {v / GIB:.2f}" for k, v in phases.items() if k != m.peak_phase)
  lines.append(
    f"peak      {m.peak_phase}: {m.peak / GIB:.2f} GiB = persistent "
    f"{m.persistent / GIB:.2f} + {m.peak_phase} {phases[m.peak_phase] / GIB:.2f} "
    f"(other phases: {rest})"
  )
  if p.usable_gib is None:
    lines.append(f"device    {p.memory_source}")
    lines.append("verdict   unknown")
  else:
    lines.append(
      f"device    {p.usable_gib:.2f} GiB usable ({p.memory_source}); the plan must "
      f"stay within {p.budget_gib:.2f} GiB"
    )
    if p.fits:
      lines.append(f"verdict   fits: {m.peak / GIB:.2f} <= {p.budget_gib:.2f} GiB")
    else:
      fixes = "; or ".join(p.fixes) if p.fixes else "no single knob"
      lines.append(
        f"verdict   does not fit: {m.peak / GIB:.2f} > {p.budget_gib:.2f} GiB; turn {fixes}"
      )
  lines += [f"note      {n}" for n in p.notes]
  return "\n".join(lines)
