"""The tensor collectives under the name the installed torch prefers: torch 2.14 renamed
all_gather_into_tensor and reduce_scatter_tensor to all_gather_single and reduce_scatter_single
(same arguments) and warns on the old names; older torch (2.11, say) has only the old ones."""
import torch.distributed as dist

all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
