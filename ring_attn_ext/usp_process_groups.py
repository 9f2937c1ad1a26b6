"""The process groups of Ulysses x ring attention (usp_attention.py): the ranks of one process group
arranged as a grid of Ulysses groups and rings.

    groups = usp_groups(ulysses_degree, group=None)

The P ranks of `group` (None: the default group) form P / U Ulysses groups of U = ulysses_degree
consecutive ranks (group ranks U*j .. U*j + U - 1) and U rings of P / U ranks each (group ranks
i, i + U, i + 2U, ...). Consecutive ranks are usually the GPUs of one host, where the all-to-all of
a Ulysses group, whose volume grows with U, runs over NVLink; the rings span hosts, where the ring
hides its transfers behind attention. U = P is pure Ulysses (rings of one rank), U = 1 a plain ring.

Every rank of `group` calls usp_groups together, with the same ulysses_degree (checked: every rank
raises the same error otherwise). Each rank makes only the two process groups it belongs to
(torch.distributed.new_group with use_local_synchronization), so ranks outside `group` take no
part. Make the groups once and pass them to every call.

One exception: when the default process group was initialised with a device_id (eager NCCL),
torch makes every subgroup by splitting the default group's NCCL communicator, a collective that
every rank of the default group must join. Each rank then splits once for its Ulysses group and
once for its ring, all in step, only when `group` is the default group itself; for a smaller
`group` the ranks outside it would never join and the others would hang, so usp_groups refuses it.
"""
import typing

import torch.distributed as dist

from .sharding import ring_size

UspGroups = typing.NamedTuple("UspGroups", [
    ("group", typing.Any),          # the parent process group (dist.group.WORLD for None)
    ("rank", int),                  # this rank in the parent group
    ("world_size", int),            # P
    ("ulysses_degree", int),        # U: ranks per Ulysses group
    ("ring_degree", int),           # P / U: ranks per ring
    ("ulysses_group", typing.Any),  # this rank's Ulysses group
    ("ulysses_rank", int),          # rank % U
    ("ring_group", typing.Any),     # this rank's ring
    ("ring_rank", int),             # rank // U
])


def usp_groups(ulysses_degree, group=None):
    """This rank's UspGroups for Ulysses groups of `ulysses_degree` ranks within `group` (see the
    module docstring). Collective over `group`."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("usp_groups needs torch.distributed: call torch.distributed.init_process_group first")
    parent = dist.group.WORLD if group is None else group
    rank = dist.get_rank(parent)
    if rank < 0:
        raise ValueError("usp_groups: this process is not a member of the process group passed as `group`")
    if dist.get_world_size(parent) != dist.get_world_size() and _subgroups_split_the_default_group():
        raise ValueError("usp_groups(group=...): the default process group was initialised with a device_id, so "
                         "torch makes subgroups by splitting its NCCL communicator, which every rank must join; "
                         "call usp_groups on every rank with group=None, or initialise without device_id")
    world_size = dist.get_world_size(parent)
    # Agree before making any group: a rank whose degree differs would otherwise wait forever in
    # new_group for peers that form other groups.
    try:
        ring_size(world_size, ulysses_degree)
        mine = ulysses_degree
    except ValueError as error:
        mine = None
        own_error = error
    degrees = [None] * world_size
    dist.all_gather_object(degrees, mine, group=parent)
    if mine is None:
        raise own_error
    if any(degree != mine for degree in degrees):
        raise ValueError(f"usp_groups: the ranks of the process group passed different or invalid ulysses_degree "
                         f"values {degrees} (None: rejected there); every rank must pass the same one")
    members = dist.get_process_group_ranks(parent)  # global ranks, in group-rank order
    ring_rank, ulysses_rank = divmod(rank, ulysses_degree)
    ulysses_ranks = members[ring_rank * ulysses_degree:(ring_rank + 1) * ulysses_degree]
    ring_ranks = members[ulysses_rank::ulysses_degree]
    # Every rank makes its Ulysses group first, then its ring: the same order on all members of each.
    ulysses_group = dist.new_group(ulysses_ranks, use_local_synchronization=True)
    ring_group = dist.new_group(ring_ranks, use_local_synchronization=True)
    return UspGroups(parent, rank, world_size, ulysses_degree, world_size // ulysses_degree,
                     ulysses_group, ulysses_rank, ring_group, ring_rank)


def _subgroups_split_the_default_group():
    """Whether torch.distributed.new_group splits the default group's communicator (it does once a
    device is bound to the default group: eager NCCL initialisation)."""
    return getattr(dist.group.WORLD, "bound_device_id", None) is not None
