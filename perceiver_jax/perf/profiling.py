"""Where a compiled step's time goes: time and matmul FLOP rate per module.

`profile_step` traces a few calls of a compiled step with `jax.profiler`, then
matches the trace's events (one per executed XLA instruction: a fusion, a dot,
a copy; inside a loop, one per iteration) to the instructions of the compiled
HLO module. Instructions are grouped by the JAX name stack that XLA keeps in
their metadata, so a group is a model module (`encoder/latent_transformer/
latent_block_*/mlp/hidden`, layer indices folded into `*`) in one pass:
forward, backward (under `transpose(...)`), or `other` (outside the model,
e.g. the optimizer update). For each group: its wall time per step, the
median over the traced steps with their minimum and maximum (the machine's
noise shows there first); its ops' own durations; its share; the FLOPs of the
matrix products it ran (2 per multiply-add, as perceiver_jax.flops counts, but
read from the HLO that ran, once per executed event) and their rate.

XLA:CPU runs independent instructions concurrently, each then on fewer
threads, so an op's own duration overstates its cost. Wall time splits every
stretch in which k ops run evenly among them (1/k each): the groups' wall
times add up to the time in which any op runs, and FLOP rates use them. The
split is even, not by threads used: an op beside one that holds both cores
gets too little time, and its rate can exceed the machine's peak. Times
are those of a traced run (tracing adds some overhead). The FLOPs of all
groups add up to the step's matmul FLOPs.
"""

import collections
import dataclasses
import glob
import gzip
import json
import math
import os
import re
import statistics
import tempfile
import time
from typing import Any, Callable, Optional

import jax

from perceiver_jax.backends.cpu import attention as cpu_attention
from perceiver_jax.backends.cpu import matmul as cpu_matmul

# Instructions whose time is that of the instructions they run, which the
# trace lists on their own.
_CONTROL_FLOW = ('while', 'call', 'conditional')

_COMPUTATION = re.compile(r'^(?:ENTRY )?%([\w.\-]+) .*\{$')
_INSTRUCTION = re.compile(
    r'^\s*(?:ROOT )?%([\w.\-]+) = (\([^=]*?\)|\w+\[[\d,]*\](?:\{[^}]*\})?)'
    r' ([\w\-]+)\(([^)]*)\)(.*)$')
_SHAPE = re.compile(r'^\w+\[([\d,]*)\]')
_OPERAND = re.compile(r'%([\w.\-]+)')
_CALLED = re.compile(r'\b(?:calls|to_apply)=%([\w.\-]+)')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TRANSPOSE_A = re.compile(r'transpose_a = true')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_NEED = re.compile(r'\b(need_\w+) = (true|false)')
_LHS_CONTRACTING = re.compile(r'lhs_contracting_dims=\{([\d,]*)\}')


@dataclasses.dataclass
class Instruction:
  """One instruction of an HLO module, as far as profiling needs it."""
  name: str
  opcode: str
  op_name: str  # JAX name stack + primitive ('' if none).
  dot_flops: int  # Of its own dot, or of the dots of the computations it
                  # calls (a fusion's); 0 for control flow.


def _dims(shape: str) -> Optional[list[int]]:
  match = _SHAPE.match(shape)
  if match is None:
    return None
  return [int(d) for d in match.group(1).split(',') if d]


def parse_hlo(text: str) -> dict[str, Instruction]:
  """The instructions of an HLO module's text (`compiled.as_text()`), by name.

  Raises:
    ValueError: if the text holds no HLO computation.
  """
  computations: dict[str, list[tuple[str, str, str, str, str]]] = {}
  current = None
  for line in text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = computations.setdefault(header.group(1), [])
      continue
    instruction = _INSTRUCTION.match(line)
    if instruction and current is not None:
      current.append(instruction.groups())
  if not computations:
    raise ValueError('No HLO computation found in the given text.')

  shapes = {}  # Instruction names are unique across the module.
  for instructions in computations.values():
    for name, shape, _, _, _ in instructions:
      shapes[name] = _dims(shape)

  def own_flops(shape, opcode, operands, attributes) -> int:
    out = _dims(shape)
    lhs = shapes.get((_OPERAND.findall(operands) or [''])[0])
    target = _TARGET.search(attributes) if opcode == 'custom-call' else None
    target = target and target.group(1)
    # cpu_matmul's products: op(a) op(b), batched.
    if target == cpu_matmul.TARGET:
      if out is None or lhs is None:
        return 0
      transposed = _TRANSPOSE_A.search(attributes)
      return 2 * math.prod(out) * lhs[-2 if transposed else -1]
    # cpu_attention's fused attention, forward or backward.
    if target in cpu_attention.TARGETS:
      qkv = [shapes.get(o) for o in _OPERAND.findall(operands)[:3]]
      if len(qkv) < 3 or None in qkv:
        return 0
      needs = {name: value == 'true'
               for name, value in _NEED.findall(attributes)}
      return cpu_attention.flops(target, *qkv, **needs)
    if opcode != 'dot':
      return 0
    contracting = _LHS_CONTRACTING.search(attributes)
    if out is None or lhs is None or contracting is None:
      return 0
    dims = [int(d) for d in contracting.group(1).split(',') if d]
    return 2 * math.prod(out) * math.prod(lhs[d] for d in dims)

  totals: dict[str, int] = {}

  def computation_flops(name: str) -> int:  # HLO calls form no cycles.
    if name not in totals:
      totals[name] = sum(
          own_flops(shape, opcode, operands, attributes)
          + sum(computation_flops(c) for c in _CALLED.findall(attributes))
          for _, shape, opcode, operands, attributes in computations.get(
              name, []))
    return totals[name]

  parsed = {}
  for instructions in computations.values():
    for name, shape, opcode, operands, attributes in instructions:
      flops = own_flops(shape, opcode, operands, attributes)
      if opcode not in _CONTROL_FLOW:
        flops += sum(computation_flops(c) for c in _CALLED.findall(attributes))
      op_name = _OP_NAME.search(attributes)
      parsed[name] = Instruction(name, opcode,
                                 op_name.group(1) if op_name else '', flops)
  return parsed


# Name-stack segments that say how, not where: jit wrappers, loops, remat.
_PLUMBING = re.compile(
    r'^(jit\(.*\)|pjit\(.*\)|while|body|cond|closed_call|checkpoint|remat'
    r'|rematted_computation|vmap\(.*\)|cond_\w+|branch_\d+_fun|scan)$')
_WRAPPER = re.compile(r'^(\w+)\((.*)\)$')


def module_and_pass(op_name: str) -> tuple[str, str]:
  """('encoder/.../mlp/hidden', 'forward'|'backward'|'other') of a name stack
  such as 'jit(train_step)/transpose(jvp(perceiver))/encoder/.../dot_general'.

  The last segment (the primitive) is dropped; `jvp(m)` and `transpose(m)`
  are unwrapped to `m` and mark the pass; a trailing `_<number>` of a segment
  becomes `_*`, so repeated layers fall into one group. A stack with no
  module left ('add', 'jit(norm)/mul': the optimizer's ops) is `other`; any
  other is `backward` under `transpose(...)` and `forward` otherwise (all of
  a forward-only step's model ops).
  """
  # XLA joins the names of ops it merged with ';': the first one stands.
  segments = op_name.split(';')[0].split('/')[:-1]
  kept, passes = [], set()
  for segment in segments:
    while True:  # transpose(jvp(perceiver)) -> perceiver.
      wrapper = _WRAPPER.match(segment)
      if not wrapper or wrapper.group(1) not in ('jvp', 'transpose'):
        break
      passes.add(wrapper.group(1))
      segment = wrapper.group(2)
    if _PLUMBING.match(segment):
      continue
    kept.append(re.sub(r'_\d+$', '_*', segment))
  module = '/'.join(kept)
  if not module:
    return '', 'other'
  if 'transpose' in passes:
    return module, 'backward'
  return module, 'forward'


def _trace_events(logdir: str, module_name: Optional[str]
                  ) -> dict[str, list[tuple[float, float]]]:
  """(start, duration) in microseconds of each traced HLO op, by op name."""
  files = glob.glob(os.path.join(logdir, '**', '*.trace.json.gz'),
                    recursive=True)
  if not files:
    raise RuntimeError(f'jax.profiler wrote no *.trace.json.gz in {logdir}.')
  with gzip.open(max(files, key=os.path.getmtime)) as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  by_op = collections.defaultdict(list)
  for event in events:
    args = event.get('args') or {}
    if event.get('ph') != 'X' or 'hlo_op' not in args:
      continue
    if module_name and args.get('hlo_module') != module_name:
      continue
    by_op[args['hlo_op']].append((event['ts'], event['dur']))
  return by_op


def _per_step_sums(events: list[tuple[float, float]], steps: int
                   ) -> tuple[list[float], int]:
  """(summed duration in each traced step, events per step).

  An op runs the same number of times in every step, so its events, in time
  order, split into `steps` equal runs; should they not, each step gets the
  mean.
  """
  per_step, extra = divmod(len(events), steps)
  if extra:
    return [sum(d for _, d in events) / steps] * steps, per_step
  ordered = [d for _, d in sorted(events)]
  return [sum(ordered[i * per_step:(i + 1) * per_step])
          for i in range(steps)], per_step


def _split_overlaps(events: dict[str, list[tuple[float, float]]]
                    ) -> dict[str, list[tuple[float, float]]]:
  """Each event's share of the wall clock: (start, microseconds), where a
  stretch of time in which k events run (on different threads) counts 1/k
  for each. The shares add up to the time in which any event runs."""
  flat, points = [], []
  for op, op_events in events.items():
    for start, duration in op_events:
      points.append((start, 1, len(flat)))
      points.append((start + duration, 0, len(flat)))  # Ends sort first.
      flat.append([op, start, 0.0])
  points.sort()
  active, last = set(), None
  for time_us, is_start, index in points:
    if active and time_us > last:
      share = (time_us - last) / len(active)
      for i in active:
        flat[i][2] += share
    last = time_us
    if is_start:
      active.add(index)
    else:
      active.discard(index)
  shares = collections.defaultdict(list)
  for op, start, share in flat:
    shares[op].append((start, share))
  return shares


def profile_step(run: Callable[[], Any], hlo_text: str, *, steps: int = 3
                 ) -> dict[str, Any]:
  """Traces `steps` calls of `run` (a compiled step), after one untraced.

  Args:
    run: runs one step of the compiled module whose text is `hlo_text`.
    hlo_text: `compiled.as_text()`.
    steps: traced calls; times are medians over them. Events of modules
      other than `hlo_text`'s are ignored.

  Returns:
    JSON-ready: `groups` (module, pass, ms_per_step: the median over the
    traced steps of the group's wall time, min_ms and max_ms over the steps,
    op_ms_per_step: its ops' own durations, share, gflop_per_step,
    gflops_per_s, num_ops), sorted by wall time; busy_ms_per_step (the time
    in which any op runs) and the matmuls' part of it; traced_step_s (the
    median time of a traced call).
  """
  if steps < 1:
    raise ValueError(f'steps must be >= 1, got {steps}.')
  instructions = parse_hlo(hlo_text)
  header = re.search(r'^HloModule ([\w.\-]+)', hlo_text, re.MULTILINE)
  module_name = header.group(1) if header else None
  # One untraced call, waited for: no earlier work runs into the trace.
  jax.block_until_ready(run())
  with tempfile.TemporaryDirectory() as logdir:
    walls = []
    with jax.profiler.trace(logdir):
      for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(run())
        walls.append(time.perf_counter() - start)
    events = _trace_events(logdir, module_name)

  events = {op: op_events for op, op_events in events.items()
            if op in instructions
            and instructions[op].opcode not in _CONTROL_FLOW}
  wall = _split_overlaps(events)
  groups = collections.defaultdict(lambda: {
      'us': [0.0] * steps, 'wall_us': [0.0] * steps, 'flops': 0, 'ops': 0})
  for op, op_events in events.items():
    instruction = instructions[op]
    group = groups[module_and_pass(instruction.op_name)]
    sums, per_step = _per_step_sums(op_events, steps)
    wall_sums, _ = _per_step_sums(wall[op], steps)
    group['us'] = [a + b for a, b in zip(group['us'], sums)]
    group['wall_us'] = [a + b for a, b in zip(group['wall_us'], wall_sums)]
    group['flops'] += instruction.dot_flops * per_step
    group['ops'] += 1
  for group in groups.values():
    group['median_wall_us'] = statistics.median(group['wall_us'])
  total_us = sum(g['median_wall_us'] for g in groups.values())
  matmul_us = sum(g['median_wall_us'] for g in groups.values() if g['flops'])
  matmul_flops = sum(g['flops'] for g in groups.values())
  rows = []
  for (module, pass_), group in sorted(
      groups.items(), key=lambda kv: -kv[1]['median_wall_us']):
    us = group['median_wall_us']
    rows.append({
        'module': module or '(outside the model)', 'pass': pass_,
        'ms_per_step': us / 1e3,
        'min_ms': min(group['wall_us']) / 1e3,
        'max_ms': max(group['wall_us']) / 1e3,
        'op_ms_per_step': statistics.median(group['us']) / 1e3,
        'share': us / total_us if total_us else 0.0,
        'gflop_per_step': group['flops'] / 1e9,
        'gflops_per_s': (group['flops'] / us / 1e3
                         if group['flops'] and us else None),
        'num_ops': group['ops']})
  return {
      'groups': rows,
      'traced_step_s': statistics.median(walls),
      'busy_ms_per_step': total_us / 1e3,
      'matmul_ms_per_step': matmul_us / 1e3,
      'matmul_gflop_per_step': matmul_flops / 1e9,
      'matmul_gflops_per_s': (matmul_flops / matmul_us / 1e3
                              if matmul_us else None),
      'traced_steps': steps,
  }


def format_table(profile: dict[str, Any], *, top: int = 25) -> str:
  """A readable table of `profile_step`'s result (the `top` groups)."""
  lines = [f'{"ms/step":>8} {"min-max":>13} {"op ms":>7} {"share":>6} '
           f'{"GFLOP":>7} {"GFLOP/s":>8}  {"pass":8} module']
  for row in profile['groups'][:top]:
    rate = row['gflops_per_s']
    spread = f'{row["min_ms"]:.1f}-{row["max_ms"]:.1f}'
    lines.append(
        f'{row["ms_per_step"]:8.1f} {spread:>13} {row["op_ms_per_step"]:7.1f} '
        f'{row["share"]:6.1%} '
        f'{row["gflop_per_step"]:7.3g} '
        f'{"" if rate is None else f"{rate:8.1f}":>8}  '
        f'{row["pass"]:8} {row["module"]}')
  hidden = len(profile['groups']) - top
  if hidden > 0:
    lines.append(f'... {hidden} more groups')
  rate = profile['matmul_gflops_per_s']
  lines.append(
      f'traced step {profile["traced_step_s"]:.3f} s; ops running '
      f'{profile["busy_ms_per_step"]:.1f} ms of it, matmuls '
      f'{profile["matmul_ms_per_step"]:.1f} ms '
      f'({profile["matmul_gflop_per_step"]:.2f} GFLOP'
      + ('' if rate is None else f', {rate:.1f} GFLOP/s') + ')')
  return '\n'.join(lines)
