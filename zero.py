"""
ShardedAdamW: ZeRO stages 1, 2 and 3 (Rajbhandari et al. 2020, arXiv:1910.02054) over torch.distributed, with
exactly the maths of torch.optim.AdamW(foreach=False).

Layout. The parameters are cut into *units*, each flattened into one fp32 buffer padded to a multiple of the world
size N; rank r owns the contiguous slice [r*s, (r+1)*s), s = ceil(n/N), of every unit, and keeps AdamW's two moments
for that slice only. Inside a unit the parameters sit group by group, so a slice meets each weight-decay group in
one contiguous run. Stages 1/2 have a single unit (every parameter); stage 3 has one unit per transformer block
(`model.blocks[i]`) plus one for everything else (the tied embedding/lm_head, norm_f, MTP heads).

Per optimizer step (Psi = parameter count; volume in elements, per rank):
  stage 1  backward: gradients accumulate locally in the full .grad, no communication, on every micro-step
           reduce_gradients: one reduce-scatter(AVG) of the flat gradient -> this rank's gradient slice   Psi
           grad_norm: one all-reduce of a single number
           step: AdamW on the slice, then one all-gather of the flat parameters (in place)              Psi
  stage 2  the same collectives; the full .grad tensors are freed as soon as they are reduce-scattered     2 Psi
  stage 3  forward: each block's unit is all-gathered before it runs and freed after                    Psi
           backward: all-gathered again before the block's backward, and as soon as every parameter
           of the unit has its gradient, reduce-scattered into the unit's gradient slice and freed       Psi + Psi
           step: AdamW on the slice; nothing is gathered (the next forward does it)
That is the paper's section 7: stages 1/2 cost 2 Psi, what a DDP all-reduce costs; stage 3 costs 3 Psi, 1.5x.
(The non-block unit is gathered once per forward and kept through backward, so it costs 2x, not 3x, of itself.)

Memory per rank, model states (paper section 5, mixed-precision Adam, K = 12): plain DP 16 Psi bytes;
stage 1 4 Psi + 12 Psi/N; stage 2 2 Psi + 14 Psi/N; stage 3 16 Psi/N. Our setup is fp32 parameters with autocast:
the fp32 parameter *is* the master copy and autocast makes its bf16 copies on the fly, per op. So per rank we hold
  stage 1: params 4 Psi + grads 4 Psi + moments 8 Psi/N
  stage 2: the same peak during backward, because micro-steps accumulate in the full .grad without communicating;
           after reduce_gradients only 4 Psi + 4 Psi/N (grad slice) + 8 Psi/N. The paper's 2 Psi + 14 Psi/N needs the
           reduce-scatter inside backward at every micro-step (DeepSpeed does that, at k x the communication).
  stage 3: 16 Psi/N (param, grad and moment slices) plus one gathered unit (params + grads) at a time, plus the
           non-block unit, which stays gathered from forward to the end of backward.
So stages 1 and 2 differ only in when the full gradient is freed; stage 3 is where the memory really goes.

Rules. Build the optimizer after the model is on its device. Stage 3 takes `model=` and touches it: the
parameters keep their identity and shape, but between uses their storage is empty, so read or load them only
inside `with optimizer.full_params():`. At world size 1 (or without torch.distributed initialised) every stage
degenerates to plain AdamW: no collective is called, the slice is the whole buffer. A parameter without a
gradient is treated as a zero gradient (torch.optim.AdamW would skip it).
"""

import contextlib
import math

import torch
import torch.distributed as dist


def reduce_scatter_mean(out, inp, group):
    """out = this rank's chunk of the mean of inp over the ranks. (torch 2.13 renamed reduce_scatter_tensor.)"""
    fn = dist.reduce_scatter_single if hasattr(dist, 'reduce_scatter_single') else dist.reduce_scatter_tensor
    fn(out, inp, op=dist.ReduceOp.AVG, group=group)


def all_gather_flat(out, inp, group):
    """out = every rank's inp, concatenated in rank order."""
    fn = dist.all_gather_single if hasattr(dist, 'all_gather_single') else dist.all_gather_into_tensor
    fn(out, inp, group=group)


class Unit:
    """Parameters that are flattened, sharded and (stage 3) gathered together. `full` is the padded flat buffer
    (n_pad,) the parameters are views of; `shard` is this rank's slice of it (s,), a view of `full` in stages 1/2
    and a tensor of its own in stage 3, where full's storage exists only while gathered."""

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
            p.data = self.full[offset:offset + p.numel()].view_as(p)  # same Parameter object, new storage
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
    """AdamW whose state, and from stage 2 gradients, and at stage 3 parameters, are sharded over the ranks.
    See the module docstring for the phases, volumes and memory. Call order per optimizer step:
    micro-steps of forward/backward -> reduce_gradients() -> grad_norm() -> clip_grads_() -> step() -> zero_grad()."""

    def __init__(self, param_groups, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, stage=1, process_group=None,
                 model=None):
        if stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3 (stage 0 is DDP + torch.optim.AdamW), not {stage}")
        if (stage == 3) != (model is not None):
            raise ValueError("stage 3 needs model= (its blocks are gathered one at a time); stages 1/2 take no model")
        self.stage, self.group, self.betas, self.eps = stage, process_group, betas, eps
        distributed = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(process_group) if distributed else 1
        self.rank = dist.get_rank(process_group) if distributed else 0
        self.step_count = 0

        # unique parameters, group by group (a tied parameter counts once, in the first group that lists it)
        seen, self.param_groups = set(), []
        for group in param_groups:
            params = [p for p in group['params'] if id(p) not in seen and not seen.add(id(p))]
            self.param_groups.append(dict(params=params, lr=group.get('lr', lr),
                                          weight_decay=group.get('weight_decay', weight_decay)))
        self.order = order = [p for g in self.param_groups for p in g['params']]
        if any(p.dtype != torch.float32 for p in order):
            raise ValueError("ShardedAdamW keeps fp32 parameters (autocast makes the low-precision copies)")
        self.group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g['params']}

        if stage < 3:
            self.units = [Unit(order, self.world_size, self.rank, stage)]
        else:
            missing = {id(p) for p in model.parameters()} - seen
            if missing:
                raise ValueError(f"stage 3: {len(missing)} model parameters are in no param group")
            block_ids = [{id(q) for q in b.parameters()} for b in model.blocks]
            blocks = [[p for p in order if id(p) in ids] for ids in block_ids]
            in_blocks = {id(p) for b in blocks for p in b}
            self.units = [Unit(b, self.world_size, self.rank, stage) for b in blocks]
            rest = [p for p in order if id(p) not in in_blocks]
            if rest:
                self.units.append(Unit(rest, self.world_size, self.rank, stage))
            self._install_hooks(model)
        # per unit: (group index, start, end) runs of this rank's slice, in slice coordinates
        self.runs = [self._runs(u) for u in self.units]

    def _runs(self, unit):
        runs, offset = [], 0
        for p, k in zip(unit.params, unit.numels):
            start, end = max(offset - unit.lo, 0), min(offset + k - unit.lo, unit.s)
            g = self.group_of[id(p)]
            if start < end:
                if runs and runs[-1][0] == g and runs[-1][2] == start:
                    runs[-1] = (g, runs[-1][1], end)
                else:
                    runs.append((g, start, end))
            offset += k
        return runs

    # ---- stage 3: gather / free / reduce around each block ----

    def _gather(self, unit):
        if unit.full.untyped_storage().nbytes() == 0:
            unit.full.untyped_storage().resize_(unit.full.numel() * unit.full.element_size())
            # write through .data: a tensor with its own version counter, so the tensors autograd saved from
            # the parameters (views of this storage) do not look modified in place
            if self.world_size == 1:
                unit.full.data.copy_(unit.shard)
            else:
                all_gather_flat(unit.full.data, unit.shard, self.group)

    @staticmethod
    def _free(unit):
        unit.full.untyped_storage().resize_(0)

    def _reduce(self, unit):
        """All of the unit's gradients are in: average them into the gradient slice, free them and the unit."""
        flat = unit.flat_grad()
        for p in unit.params:
            p.grad = None
        if self.world_size == 1:
            part = flat[:unit.s]
        else:
            part = torch.empty(unit.s, device=flat.device)
            reduce_scatter_mean(part, flat, self.group)
        unit.grad = part if unit.grad is None else unit.grad.add_(part)  # micro-steps accumulate in the slice
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
        if rest is not None:  # gathered for the whole forward and backward: the tied lm_head is used first and last
            model.register_forward_pre_hook(lambda m, args: self._gather(rest))
            model.register_forward_hook(lambda m, args, out: None if torch.is_grad_enabled() else self._free(rest))

    @contextlib.contextmanager
    def full_params(self):
        """Stage 3: every parameter gathered, so model.state_dict() / load_state_dict() work inside (clone what
        you keep: the storage goes away on exit); on exit this rank's slices are taken from the (maybe loaded)
        parameters. Stages 1/2: parameters are always whole, nothing to do. Collective."""
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
        """After the last micro-step's backward: the mean gradient over ranks, this rank's slice only."""
        for unit in self.units:
            if self.stage == 3:
                if unit.arrived:  # some parameters got no gradient this backward: reduce what there is
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
            else:
                unit.grad = torch.empty(unit.s, device=flat.device)
                reduce_scatter_mean(unit.grad, flat, self.group)

    @torch.no_grad()
    def grad_norm(self):
        """Global L2 norm of the averaged gradient, from the slices (padding excluded): one all-reduce."""
        sq = sum(torch.linalg.vector_norm(u.grad[:u.valid()]).square() for u in self.units)
        if self.world_size > 1:
            dist.all_reduce(sq, group=self.group)
        return sq.sqrt().item()

    @torch.no_grad()
    def clip_grads_(self, max_norm, total_norm):
        """Scale the gradient slices by min(1, max_norm / (total_norm + 1e-6)), computed in fp32 as
        torch.nn.utils.clip_grads_with_norm_ does; every rank passes the same total_norm, so the same factor."""
        coef = (max_norm / (torch.as_tensor(total_norm, dtype=torch.float32) + 1e-6)).clamp(max=1.0)
        for unit in self.units:
            unit.grad.mul_(coef.to(unit.grad.device))

    @torch.no_grad()
    def step(self):
        """AdamW on this rank's slices, exactly as torch.optim.AdamW(foreach=False) does it per parameter;
        then (stages 1/2) the all-gather that puts every rank's updated slice into every rank's parameters."""
        self.step_count += 1
        beta1, beta2 = self.betas
        bias_correction1 = 1 - beta1 ** self.step_count
        bias_correction2_sqrt = (1 - beta2 ** self.step_count) ** 0.5
        for unit, runs in zip(self.units, self.runs):
            for g, start, end in runs:
                lr, wd = self.param_groups[g]['lr'], self.param_groups[g]['weight_decay']
                param, grad = unit.shard[start:end], unit.grad[start:end]
                exp_avg, exp_avg_sq = unit.exp_avg[start:end], unit.exp_avg_sq[start:end]
                if wd != 0:
                    param.mul_(1 - lr * wd)  # decoupled weight decay
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
                param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
            if self.stage < 3 and self.world_size > 1:
                all_gather_flat(unit.full, unit.shard.clone(), self.group)
            if self.stage == 3:  # a unit still gathered (a forward without backward) is stale now
                self._free(unit)

    def zero_grad(self, set_to_none=True):
        """Drop the gradients: the slices, and any full .grad still held (stage 1 keeps them until here)."""
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

    def state_dict(self):
        """This rank's part: step count, lr/wd per group, its moment slices and the layout they belong to.
        Each rank saves its own; load it back at the same world size and stage (else use full_state_dict)."""
        return dict(step=self.step_count, layout=self._layout(), rank=self.rank,
                    groups=[dict(lr=g['lr'], weight_decay=g['weight_decay']) for g in self.param_groups],
                    exp_avg=[u.exp_avg.clone() for u in self.units], exp_avg_sq=[u.exp_avg_sq.clone() for u in self.units])

    def load_state_dict(self, state):
        if state['layout'] != self._layout() or state['rank'] != self.rank:
            raise ValueError(f"optimizer shard saved for {state['layout']} (rank {state['rank']}) does not fit "
                             f"{self._layout()} (rank {self.rank}): resume through full_state_dict/load_full_state_dict")
        self.step_count = state['step']
        for group, saved in zip(self.param_groups, state['groups']):
            group.update(saved)
        for unit, m, v in zip(self.units, state['exp_avg'], state['exp_avg_sq']):
            unit.exp_avg.copy_(m)
            unit.exp_avg_sq.copy_(v)

    @torch.no_grad()
    def load_shards(self, states):
        """Every rank's state_dict() from a run of the same stage at another world size, in rank order: the slices
        are concatenated back into whole buffers (padding dropped) and this rank takes its new slice. Not a
        collective; each rank reads all the old shards (O(parameters) memory while loading)."""
        old = states[0]['layout']
        same_units = (old['stage'] == 3) == (self.stage == 3) and old['sizes'] == [u.n for u in self.units]
        if not same_units or len(states) != old['world_size'] or [s['rank'] for s in states] != list(range(len(states))):
            raise ValueError(f"optimizer shards for {old} do not fit {self._layout()}: stages 1/2 and stage 3 "
                             "cut the parameters differently")
        self.step_count = states[0]['step']
        for group, saved in zip(self.param_groups, states[0]['groups']):
            group.update(saved)
        for i, unit in enumerate(self.units):
            for name in ('exp_avg', 'exp_avg_sq'):
                whole = torch.cat([s[name][i].to(unit.full.device) for s in states])[:unit.n]  # (n,)
                part = getattr(unit, name)
                part.zero_()
                part[:unit.valid()].copy_(whole[unit.lo:unit.lo + unit.valid()])

    @torch.no_grad()
    def full_state_dict(self):
        """Collective: the whole optimizer state, on every rank, in torch.optim.AdamW's own state_dict format
        (parameters numbered group by group, tied ones once). It depends on no world size or stage, and a
        torch.optim.AdamW over the same param groups loads it (and the other way round: see load_full_state_dict).
        Costs O(parameters) memory on every rank while it exists."""
        index = {id(p): i for i, p in enumerate(self.order)}
        state = {}
        for unit in self.units:
            moments = []
            for part in (unit.exp_avg, unit.exp_avg_sq):
                full = torch.empty_like(unit.full)
                if self.world_size == 1:
                    full.copy_(part)
                else:
                    all_gather_flat(full, part, self.group)
                moments.append(full)
            offset = 0
            for p, k in zip(unit.params, unit.numels):
                if self.step_count > 0:  # like torch: no state before the first step
                    state[index[id(p)]] = dict(step=torch.tensor(float(self.step_count)),
                                               exp_avg=moments[0][offset:offset + k].view(p.shape).clone(),
                                               exp_avg_sq=moments[1][offset:offset + k].view(p.shape).clone())
                offset += k
        groups = [dict(params=[index[id(p)] for p in g['params']], lr=g['lr'], weight_decay=g['weight_decay'],
                       betas=self.betas, eps=self.eps) for g in self.param_groups]
        return dict(state=state, param_groups=groups)

    @torch.no_grad()
    def load_full_state_dict(self, state):
        """Take this rank's slices of a full_state_dict (saved at any world size and stage, or by
        torch.optim.AdamW over the same param groups): this is how a run resumes on another number of ranks."""
        saved = state['param_groups']
        if [len(g['params']) for g in saved] != [len(g['params']) for g in self.param_groups]:
            raise ValueError("optimizer state is for other parameter groups: "
                             f"{[len(g['params']) for g in saved]} vs {[len(g['params']) for g in self.param_groups]}")
        for group, g in zip(self.param_groups, saved):
            group.update(lr=g['lr'], weight_decay=g['weight_decay'])
        per_param = [state['state'].get(i) for i in range(len(self.order))]  # torch's keys are the same numbers
        steps = {int(s['step']) for s in per_param if s is not None}
        if len(steps) > 1 or (steps and None in per_param):
            raise ValueError("optimizer state has parameters at different step counts; cannot shard it")
        self.step_count = steps.pop() if steps else 0
        index = {id(p): i for i, p in enumerate(self.order)}
        for unit in self.units:
            for name, part in (('exp_avg', unit.exp_avg), ('exp_avg_sq', unit.exp_avg_sq)):
                flat = torch.zeros_like(unit.full)
                offset = 0
                for p, k in zip(unit.params, unit.numels):
                    s = per_param[index[id(p)]]
                    if s is not None:
                        if s[name].shape != p.shape:
                            raise ValueError(f"optimizer state {name} has shape {tuple(s[name].shape)}, "
                                             f"parameter {tuple(p.shape)}")
                        flat[offset:offset + k].copy_(s[name].flatten())
                    offset += k
                part.copy_(flat[unit.lo:unit.lo + unit.s])
