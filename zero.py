"""
ShardedAdamW: data-parallel AdamW over torch.distributed, used like a torch optimizer, with a
stage 0 (plain data parallelism: an all-reduce of the gradients) and ZeRO stages 1, 2 and 3
(Rajbhandari et al. 2020, arXiv:1910.02054). The update is torch's own AdamW
(torch.optim.adamw.adamw: the per-tensor loop on the CPU, the fused kernel on CUDA) applied to this
rank's slice: torch.optim.AdamW's maths.

    optimizer = ShardedAdamW(param_groups, lr=3e-4, stage=1, max_grad_norm=1.0)
    loss.backward()                # any number of micro-steps: gradients accumulate in .grad
    grad_norm = optimizer.step()   # reduce over the ranks, clip to max_grad_norm, update
    optimizer.zero_grad()

reduce_gradients() runs step()'s first phase alone and returns the global gradient norm, for a
caller that looks at the norm before it steps (train.py skips non-finite steps and tightens the
clip on explosions).

Layout. The parameters are cut into *units*, each flattened into one fp32 buffer padded to a
multiple of the world size N; rank r owns the contiguous slice [r*s, (r+1)*s), s = ceil(n/N), of
every unit, and keeps AdamW's two moments for that slice only. Inside a unit the parameters sit
group by group, so a slice meets each weight-decay group in one contiguous run. Stages 0-2 have a
single unit (every parameter; at stage 0 the slice is the whole buffer); stage 3 has one unit per
transformer block (`model.blocks[i]`) plus one for everything else (the tied embedding/lm_head,
norm_f, MTP heads).

Per optimizer step (Psi = parameter count; volume in elements, per rank):
  stage 0  backward: gradients accumulate in the full .grad, no communication
           reduce: one all-reduce of the flat gradient                                   2 Psi
           step: AdamW on all of it, on every rank (the same update everywhere)
  stage 1  backward: as stage 0
           reduce: one reduce-scatter(AVG) of the flat gradient -> this rank's slice       Psi
           step: AdamW on the slice, then one all-gather of the flat parameters           Psi
  stage 2  the same collectives; the full .grad tensors are freed once reduce-scattered
  stage 3  forward: each block's unit is all-gathered before it runs and freed after       Psi
           backward: all-gathered again before the block's backward, and as soon as every
           parameter of the unit has its gradient, reduce-scattered into the slice      2 Psi
           step: AdamW on the slice; nothing is gathered (the next forward does it)
Stages 1-3 add one small all-reduce: each parameter's squared gradient norm. That is the paper's
section 7: stages 0-2 cost 2 Psi (a ring all-reduce is a reduce-scatter plus an all-gather); stage
3 costs 3 Psi, 1.5x (the non-block unit is gathered once per forward and kept through backward: 2x,
not 3x, of itself).

Memory per rank, model states (paper section 5, mixed-precision Adam, K = 12): plain DP 16 Psi
bytes; stage 1 4 Psi + 12 Psi/N; stage 2 2 Psi + 14 Psi/N; stage 3 16 Psi/N. Here the parameters
are fp32 and autocast makes the bf16 copies on the fly, per op: the fp32 parameter *is* the master
copy. Per rank:
  stage 0: params 4 Psi + grads 4 Psi + moments 8 Psi
  stage 1: params 4 Psi + grads 4 Psi + moments 8 Psi/N
  stage 2: the same peak during backward, because micro-steps accumulate in the full .grad
           without communicating; after the reduce only 4 Psi + 4 Psi/N (grad slice) + 8 Psi/N.
           The paper's 2 Psi + 14 Psi/N needs a reduce-scatter inside every micro-step's
           backward (k x the traffic).
  stage 3: 16 Psi/N (param, grad and moment slices) plus one gathered unit (params + grads) at a
           time, plus the non-block unit, gathered from forward to the end of backward.

Rules. Build the optimizer after the model is on its device. Stage 3 takes `model=` and touches
it: the parameters keep their identity and shape, but between uses their storage is empty, so
read or load them only inside `with optimizer.full_params():`. At world size 1 (or without
torch.distributed initialised) every stage is plain AdamW: no collective is called, the slice is
the whole buffer. A parameter without a gradient counts as a zero gradient (torch.optim.AdamW
would skip it).
"""

import contextlib
import math

import torch
import torch.distributed as dist
from torch.optim.adamw import adamw


def reduce_scatter_mean(out, inp, group):
    """out = this rank's chunk of the mean of inp over the ranks (reduce_scatter_single in torch
    2.13, reduce_scatter_tensor before)."""
    fn = getattr(dist, 'reduce_scatter_single', None) or dist.reduce_scatter_tensor
    fn(out, inp, op=dist.ReduceOp.AVG, group=group)


def all_gather_flat(out, inp, group):
    """out = every rank's inp, concatenated in rank order."""
    fn = getattr(dist, 'all_gather_single', None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


class Unit:
    """Parameters that are flattened, sharded and (stage 3) gathered together. `full` is the padded
    flat buffer (n_pad,) the parameters are views of; `shard` is this rank's slice of it (s,): a
    view of `full` in stages 0-2, a tensor of its own in stage 3, where full's storage exists only
    while gathered."""

    def __init__(self, params, world_size, rank, stage):
        self.params = params
        self.numels = [p.numel() for p in params]
        self.n = sum(self.numels)
        self.s = math.ceil(self.n / world_size)
        self.lo = rank * self.s  # this rank's slice of the padded buffer: [lo, lo + s)
        device = params[0].device
        self.full = torch.zeros(self.s * world_size, device=device)
        offset = 0
        for p in params:
            self.full[offset:offset + p.numel()].copy_(p.detach().flatten())
            p.data = self.full[offset:offset + p.numel()].view_as(p)  # same Parameter, new storage
            offset += p.numel()
        self.shard = self.full[self.lo:self.lo + self.s]
        if stage == 3:
            self.shard = self.shard.clone()
            self.full.untyped_storage().resize_(0)
        self.grad = None  # (s,) averaged gradient slice
        self.exp_avg = torch.zeros(self.s, device=device)
        self.exp_avg_sq = torch.zeros(self.s, device=device)
        self.arrived = 0  # stage 3: parameters whose gradient this backward has produced

    def flat_grad(self):
        """(n_pad,) local gradients in buffer order, zeros for missing gradients and padding."""
        flat = torch.zeros_like(self.full)
        offset = 0
        for p, k in zip(self.params, self.numels):
            if p.grad is not None:
                flat[offset:offset + k].copy_(p.grad.flatten())
            offset += k
        return flat

    def valid(self):
        """Length of the part of this rank's slice that holds parameters, not padding."""
        return max(0, min(self.s, self.n - self.lo))


class ShardedAdamW:
    """AdamW whose gradients are averaged over the ranks inside step(); from stage 1 its state,
    from stage 2 its gradients and at stage 3 its parameters are sharded. The module docstring has
    the phases, volumes and memory. param_groups, zero_grad, state_dict and load_state_dict work as
    torch's do. model (required at stage 3, where its blocks are gathered one at a time) also sets
    the order of the gradient norm's sum, which clip_grad_norm_(model.parameters()) sums in."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, stage=0,
                 max_grad_norm=0.0, model=None, process_group=None):
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"stage must be 0, 1, 2 or 3, not {stage}")
        if stage == 3 and model is None:
            raise ValueError("stage 3 needs model= (its blocks are gathered one at a time)")
        self.stage, self.group, self.betas, self.eps = stage, process_group, betas, eps
        self.max_grad_norm = max_grad_norm  # 0 = no clipping; callers may change it between steps
        distributed = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(process_group) if distributed else 1
        self.rank = dist.get_rank(process_group) if distributed else 0
        shards = 1 if stage == 0 else self.world_size  # stage 0: every rank holds the whole state
        self.step_count, self.grad_norm = 0, None  # grad_norm: set by the reduce, cleared by step

        # unique parameters, group by group (a tied parameter counts once, in the first group)
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{'params': params}]
        seen, self.param_groups = set(), []
        for group in groups:
            unique = [p for p in group['params'] if id(p) not in seen and not seen.add(id(p))]
            self.param_groups.append(dict(params=unique, lr=group.get('lr', lr),
                                          weight_decay=group.get('weight_decay', weight_decay)))
        self.order = order = [p for g in self.param_groups for p in g['params']]
        if any(p.dtype != torch.float32 for p in order):
            raise ValueError("ShardedAdamW keeps fp32 parameters (autocast makes 16-bit copies)")
        self.group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g['params']}

        if stage < 3:
            self.units = [Unit(order, shards, self.rank if shards > 1 else 0, stage)]
        else:
            missing = {id(p) for p in model.parameters()} - seen
            if missing:
                raise ValueError(f"stage 3: {len(missing)} model parameters are in no param group")
            block_ids = [{id(q) for q in b.parameters()} for b in model.blocks]
            blocks = [[p for p in order if id(p) in ids] for ids in block_ids]
            in_blocks = {id(p) for b in blocks for p in b}
            self.units = [Unit(b, shards, self.rank, stage) for b in blocks]
            rest = [p for p in order if id(p) not in in_blocks]
            if rest:
                self.units.append(Unit(rest, shards, self.rank, stage))
            self._install_hooks(model)
        # per unit: (group index, start, end) runs of this rank's slice, in slice coordinates, and
        # one AdamW step counter per run (torch's functional AdamW advances it)
        self.runs = [self._runs(u) for u in self.units]
        # per unit: (parameter number, start, end) of each parameter's part of this rank's slice,
        # numbered in the model's order (else the groups'), for the gradient norm
        number = {id(p): i for i, p in enumerate(model.parameters() if model else order)}
        self.parts = [[(number[id(p)], start, end) for p, start, end in self._parts(u)]
                      for u in self.units]
        self.n_params = len(number)
        device = order[0].device
        self.fused = device.type == 'cuda'
        self.steps = [[torch.zeros((), device=device if self.fused else 'cpu') for _ in runs]
                      for runs in self.runs]

    @staticmethod
    def _parts(unit):
        """(parameter, start, end) for each of the unit's parameters that meets this rank's slice,
        in slice coordinates."""
        parts, offset = [], 0
        for p, k in zip(unit.params, unit.numels):
            start, end = max(offset - unit.lo, 0), min(offset + k - unit.lo, unit.s)
            if start < end:
                parts.append((p, start, end))
            offset += k
        return parts

    def _runs(self, unit):
        """_parts merged while they belong to one param group: one AdamW call per run."""
        runs = []
        for p, start, end in self._parts(unit):
            g = self.group_of[id(p)]
            if runs and runs[-1][0] == g and runs[-1][2] == start:
                runs[-1] = (g, runs[-1][1], end)
            else:
                runs.append((g, start, end))
        return runs

    # ---- stage 3: gather / free / reduce around each block ----

    def _gather(self, unit):
        if unit.full.untyped_storage().nbytes() == 0:
            unit.full.untyped_storage().resize_(unit.full.numel() * unit.full.element_size())
            # write through .data: a tensor with its own version counter, so the tensors autograd
            # saved from the parameters (views of this storage) do not look modified in place
            if self.world_size == 1:
                unit.full.data.copy_(unit.shard)
            else:
                all_gather_flat(unit.full.data, unit.shard, self.group)

    @staticmethod
    def _free(unit):
        unit.full.untyped_storage().resize_(0)

    def _reduce(self, unit):
        """All of the unit's gradients are in: average them into the gradient slice, free them
        and the unit's parameters."""
        flat = unit.flat_grad()
        for p in unit.params:
            p.grad = None
        if self.world_size == 1:
            part = flat[:unit.s]
        else:
            part = torch.empty(unit.s, device=flat.device)
            reduce_scatter_mean(part, flat, self.group)
        unit.grad = part if unit.grad is None else unit.grad.add_(part)  # micro-steps accumulate
        unit.arrived = 0
        self._free(unit)

    def _install_hooks(self, model):
        rest = self.units[-1] if len(self.units) > len(model.blocks) else None

        def arrived(unit):
            def hook(param):
                unit.arrived += 1
                if unit.arrived == len(unit.params):
                    self._reduce(unit)
            return hook

        for unit in self.units:
            for p in unit.params:
                p.register_post_accumulate_grad_hook(arrived(unit))
        for block, unit in zip(model.blocks, self.units):
            block.register_forward_pre_hook(lambda m, args, u=unit: self._gather(u))
            block.register_forward_hook(lambda m, args, out, u=unit: self._free(u))
            block.register_full_backward_pre_hook(lambda m, grad_out, u=unit: self._gather(u))
        if rest is not None:  # gathered through forward and backward: the tied lm_head comes first
            # and last
            model.register_forward_pre_hook(lambda m, args: self._gather(rest))
            model.register_forward_hook(
                lambda m, args, out: None if torch.is_grad_enabled() else self._free(rest))

    @contextlib.contextmanager
    def full_params(self):
        """Stage 3: every parameter gathered, so model.state_dict() / load_state_dict() work inside
        (clone what you keep: the storage goes away on exit); on exit this rank's slices are taken
        from the (maybe loaded) parameters. Stages 0-2: parameters are always whole. Collective."""
        if self.stage < 3:
            yield
            return
        for unit in self.units:
            self._gather(unit)
        try:
            yield
        finally:
            for unit in self.units:
                unit.shard.copy_(unit.full[unit.lo:unit.lo + unit.s])
                self._free(unit)

    # ---- the optimizer step ----

    @torch.no_grad()
    def reduce_gradients(self):
        """The mean gradient over the ranks (this rank's slice of it from stage 1) and its global L2
        norm, padding excluded. -> the norm as a float (a host sync); a second call returns it."""
        if self.grad_norm is not None:
            return self.grad_norm
        for unit in self.units:
            if self.stage == 3:
                if unit.arrived:  # some parameters got no gradient: reduce what there is
                    self._reduce(unit)
                if unit.grad is None:
                    unit.grad = torch.zeros_like(unit.exp_avg)
                continue
            flat = unit.flat_grad()
            if self.stage == 2:
                for p in unit.params:
                    p.grad = None
            if self.world_size == 1:
                unit.grad = flat[:unit.s]
            elif self.stage == 0:
                dist.all_reduce(flat, group=self.group)
                unit.grad = flat.div_(self.world_size)
            else:
                unit.grad = torch.empty(unit.s, device=flat.device)
                reduce_scatter_mean(unit.grad, flat, self.group)
        # as torch.nn.utils.clip_grad_norm_: each parameter's norm, then the norm of those (a
        # parameter cut between two ranks' slices: the root of its parts' summed squares)
        norms = torch.zeros(self.n_params, device=self.order[0].device)
        for unit, parts in zip(self.units, self.parts):
            for i, start, end in parts:
                norms[i] = torch.linalg.vector_norm(unit.grad[start:end])
        if self.stage > 0 and self.world_size > 1:
            norms = norms.square()
            dist.all_reduce(norms, group=self.group)
            norms = norms.sqrt()
        self.grad_norm = torch.linalg.vector_norm(norms).item()
        return self.grad_norm

    @torch.no_grad()
    def step(self):
        """Reduce (unless reduce_gradients() already did), clip the gradient to max_grad_norm as
        torch.nn.utils.clip_grads_with_norm_ does, AdamW on this rank's slices, then (stages 1/2)
        the all-gather that puts every rank's updated slice into every rank's parameters.
        -> the gradient norm before clipping."""
        norm = self.reduce_gradients()
        if 0 < self.max_grad_norm < norm:
            # in fp32, as torch computes it
            coef = self.max_grad_norm / (torch.tensor(norm, dtype=torch.float32) + 1e-6)
            for unit in self.units:
                unit.grad.mul_(coef.to(unit.grad.device))
        self.step_count += 1
        for unit, runs, steps in zip(self.units, self.runs, self.steps):
            for (g, start, end), step in zip(runs, steps):
                group = self.param_groups[g]
                adamw([unit.shard[start:end]], [unit.grad[start:end]], [unit.exp_avg[start:end]],
                      [unit.exp_avg_sq[start:end]], [], [step], foreach=False, fused=self.fused,
                      amsgrad=False, beta1=self.betas[0], beta2=self.betas[1], lr=group['lr'],
                      weight_decay=group['weight_decay'], eps=self.eps, maximize=False)
            if self.stage in (1, 2) and self.world_size > 1:
                all_gather_flat(unit.full, unit.shard.clone(), self.group)
            if self.stage == 3:  # a unit still gathered (a forward without backward) is stale now
                self._free(unit)
        self.grad_norm = None
        return norm

    def zero_grad(self, set_to_none=True):
        """Drop the gradients: the reduced slices, and any full .grad still held."""
        self.grad_norm = None
        for unit in self.units:
            unit.grad = None
            for p in unit.params:
                if p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.zero_()

    # ---- checkpoints ----

    def _layout(self):
        return dict(world_size=self.world_size, stage=self.stage, sizes=[u.n for u in self.units])

    def _set_step(self, step):
        self.step_count = step
        for steps in self.steps:
            for t in steps:
                t.fill_(step)

    def state_dict(self):
        """Stage 0: the whole state, in torch.optim.AdamW's own format (full_state_dict). Stages
        1-3: this rank's part (step count, lr/wd per group, its moment slices, their layout); each
        rank saves its own and loads it back at the same world size and stage (load_shards
        re-cuts)."""
        if self.stage == 0:
            return self.full_state_dict()
        return dict(step=self.step_count, layout=self._layout(), rank=self.rank,
                    groups=[dict(lr=g['lr'], weight_decay=g['weight_decay'])
                            for g in self.param_groups],
                    exp_avg=[u.exp_avg.clone() for u in self.units],
                    exp_avg_sq=[u.exp_avg_sq.clone() for u in self.units])

    def load_state_dict(self, state):
        """A state_dict() of this layout, or a whole state in torch's format (from any stage's
        full_state_dict, or from torch.optim.AdamW over the same param groups)."""
        if 'state' in state:
            return self.load_full_state_dict(state)
        if state['layout'] != self._layout() or state['rank'] != self.rank:
            raise ValueError(f"optimizer shard saved for {state['layout']} (rank {state['rank']}) "
                             f"does not fit {self._layout()} (rank {self.rank}): use load_shards "
                             "or load_full_state_dict")
        self._set_step(state['step'])
        for group, saved in zip(self.param_groups, state['groups']):
            group.update(saved)
        for unit, m, v in zip(self.units, state['exp_avg'], state['exp_avg_sq']):
            unit.exp_avg.copy_(m)
            unit.exp_avg_sq.copy_(v)

    @torch.no_grad()
    def load_shards(self, states):
        """Every rank's state_dict() from a run of stage 1 or 2 (into stages 0-2) or of stage 3
        (into stage 3) at any world size, in rank order: the slices are joined back into whole
        buffers (padding dropped) and this rank takes its new slice. Not a collective; each rank
        reads all the old shards."""
        old = states[0]['layout']
        same_cut = (old['stage'] == 3) == (self.stage == 3)
        same_units = same_cut and old['sizes'] == [u.n for u in self.units]
        in_order = [s['rank'] for s in states] == list(range(len(states)))
        if not same_units or len(states) != old['world_size'] or not in_order:
            raise ValueError(f"optimizer shards for {old} do not fit {self._layout()}: stages 0-2 "
                             "and stage 3 cut the parameters differently")
        self._set_step(states[0]['step'])
        for group, saved in zip(self.param_groups, states[0]['groups']):
            group.update(saved)
        for i, unit in enumerate(self.units):
            for name in ('exp_avg', 'exp_avg_sq'):
                slices = [s[name][i].to(unit.full.device) for s in states]
                whole = torch.cat(slices)[:unit.n]  # (n,)
                part = getattr(unit, name)
                part.zero_()
                part[:unit.valid()].copy_(whole[unit.lo:unit.lo + unit.valid()])

    @torch.no_grad()
    def full_state_dict(self):
        """Collective from stage 1: the whole optimizer state, on every rank, in torch.optim.AdamW's
        own state_dict format (parameters numbered group by group, tied ones once). It depends on no
        world size or stage, and a torch.optim.AdamW over the same param groups loads it.
        O(parameters) memory."""
        index = {id(p): i for i, p in enumerate(self.order)}
        state = {}
        for unit in self.units:
            moments = []
            for part in (unit.exp_avg, unit.exp_avg_sq):
                full = torch.empty_like(unit.full)
                if part.numel() == full.numel():  # unsharded: the slice is the whole buffer
                    full.copy_(part)
                else:
                    all_gather_flat(full, part, self.group)
                moments.append(full)
            offset = 0
            for p, k in zip(unit.params, unit.numels):
                if self.step_count > 0:  # like torch: no state before the first step
                    state[index[id(p)]] = dict(
                        step=torch.tensor(float(self.step_count)),
                        exp_avg=moments[0][offset:offset + k].view(p.shape).clone(),
                        exp_avg_sq=moments[1][offset:offset + k].view(p.shape).clone())
                offset += k
        groups = [dict(params=[index[id(p)] for p in g['params']], lr=g['lr'],
                       weight_decay=g['weight_decay'], betas=self.betas, eps=self.eps)
                  for g in self.param_groups]
        return dict(state=state, param_groups=groups)

    @torch.no_grad()
    def load_full_state_dict(self, state):
        """Take this rank's slices of a full_state_dict (saved at any world size and stage, or by
        torch.optim.AdamW over the same param groups): how a run resumes on other ranks."""
        saved = state['param_groups']
        if [len(g['params']) for g in saved] != [len(g['params']) for g in self.param_groups]:
            raise ValueError("optimizer state is for other parameter groups: "
                             f"{[len(g['params']) for g in saved]} vs "
                             f"{[len(g['params']) for g in self.param_groups]}")
        for group, g in zip(self.param_groups, saved):
            group.update(lr=g['lr'], weight_decay=g['weight_decay'])
        per_param = [state['state'].get(i) for i in range(len(self.order))]  # torch's numbering
        steps = {int(s['step']) for s in per_param if s is not None}
        if len(steps) > 1 or (steps and None in per_param):
            raise ValueError("optimizer state has parameters at different step counts: cannot "
                             "shard it")
        self._set_step(steps.pop() if steps else 0)
        index = {id(p): i for i, p in enumerate(self.order)}
        for unit in self.units:
            for name, part in (('exp_avg', unit.exp_avg), ('exp_avg_sq', unit.exp_avg_sq)):
                flat = torch.zeros_like(unit.full)
                offset = 0
                for p, k in zip(unit.params, unit.numels):
                    s = per_param[index[id(p)]]
                    if s is not None:
                        if s[name].shape != p.shape:
                            raise ValueError(f"optimizer state {name} has shape "
                                             f"{tuple(s[name].shape)}, parameter {tuple(p.shape)}")
                        flat[offset:offset + k].copy_(s[name].flatten())
                    offset += k
                part.copy_(flat[unit.lo:unit.lo + unit.s])
