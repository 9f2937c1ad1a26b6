"""transformers models with ring attention (hf_attention.py) on CUDA: two processes share one GPU
over gloo (K/V gathered through host copies), or, on two GPUs, one process each over NCCL; a small
Llama with GQA and a Mistral with a sliding window in the kernels' dtype, each rank feeding its
chunk of a packed stream. The reference runs the same weights on each sequence alone with
transformers' SDPA attention, in float64 (exact) and in the kernels' dtype (the baseline): logits
and the parameters' gradients summed over the ranks, by FlashAttention's rule (at most 2x, for
gradients 3x, the baseline's error against the exact run). Skips without a GPU, the compiled
extension or transformers (4.56 or later here: dtype=)."""
import pytest
import torch
import torch.distributed as dist

from conftest import GRADIENT_EPS, assert_flash_rule, requires_cuda_extension
from test_hf_attention_cpu import packed_batch, small_config, transformers  # skips without transformers
from test_ring_gpu import MULTICAST_OFF, _process_group, _spawn_ranks, kernel_config

import ring_attn_ext

# A stream of 400 tokens over two ranks: sequences of one token, and sequences across the chunk boundary.
BOUNDS = [0, 1, 150, 151, 333, 400]


def per_sequence(model, ids, weights):
    """Logits of each sequence run alone, concatenated, and the parameters' gradients of the loss
    sum(logits * weights), both float64 on the CPU."""
    bounds = zip(BOUNDS, BOUNDS[1:])
    logits = torch.cat([model(input_ids=ids[:, begin:end], use_cache=False).logits for begin, end in bounds], dim=1)
    (logits.double() * weights).sum().backward()
    return logits.double().cpu(), [p.grad.double().cpu() for p in model.parameters()]


def build(arch, head_dim, implementation, dtype, device):
    """The model in `dtype` from construction on, as from_pretrained(dtype=...) loads one: a model
    cast afterwards would also round RoPE's float32 inverse frequencies."""
    config = small_config(arch, head_dim)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=implementation,
                                                         dtype=dtype).to(device)


def _check_model(rank, world_size, device, arch, head_dim, dtype):
    torch.manual_seed(0)
    ours = build(arch, head_dim, ring_attn_ext.register_hf_attention(), dtype, device)
    references = {}
    for reference_dtype in (torch.float64, dtype):
        references[reference_dtype] = build(arch, head_dim, "sdpa", reference_dtype, device)
        references[reference_dtype].load_state_dict(ours.state_dict())  # the same (rounded) weights
    ids, positions, weights = (t.to(device) for t in packed_batch(BOUNDS, 11))
    chunk = slice(rank * BOUNDS[-1] // world_size, (rank + 1) * BOUNDS[-1] // world_size)

    ring_attn_ext.update_ring_flash_attn_params(torch.tensor(BOUNDS, dtype=torch.int32, device=device), None)
    logits = ours(input_ids=ids[:, chunk], position_ids=positions[:, chunk], use_cache=False).logits
    (logits.double() * weights[:, chunk]).sum().backward()
    # Summed over the ranks where the group's backend reduces: the host for gloo, the GPU for NCCL.
    on_host = dist.get_backend() == "gloo"
    grads = [p.grad.double().cpu() if on_host else p.grad.double() for p in ours.parameters()]
    for grad in grads:
        dist.all_reduce(grad)
    grads = [grad.cpu() for grad in grads]

    exact_logits, exact_grads = per_sequence(references[torch.float64], ids, weights)
    same_logits, same_grads = per_sequence(references[dtype], ids, weights)
    what = f"rank {rank}, {arch}, {dtype}, head_dim {head_dim}"
    assert_flash_rule(logits.cpu(), exact_logits[:, chunk], same_logits[:, chunk], 2, f"{what}: logits")
    for (parameter, _), grad, exact, same in zip(ours.named_parameters(), grads, exact_grads, same_grads):
        assert_flash_rule(grad.to(dtype), exact, same.to(dtype), 3, f"{what}: gradient of {parameter}",
                          eps=GRADIENT_EPS)


def _check_models(backend, rank, world_size, init_file, head_dim, dtype):
    with _process_group(backend, rank, world_size, init_file) as device:
        for arch in ("llama", "mistral"):
            _check_model(rank, world_size, device, arch, head_dim, dtype)


def _gloo_worker(rank, world_size, init_file, head_dim, dtype):
    _check_models("gloo", rank, world_size, init_file, head_dim, dtype)


def _nccl_worker(rank, world_size, init_file, head_dim, dtype):
    _check_models("nccl", rank, world_size, init_file, head_dim, dtype)


@requires_cuda_extension
def test_models_on_one_gpu_over_gloo_match_each_sequence_alone():
    head_dim, dtype = kernel_config()
    _spawn_ranks(_gloo_worker, 2, head_dim, dtype, "transformers models over gloo")


@requires_cuda_extension
@pytest.mark.multigpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least 2 CUDA GPUs (one process per GPU)")
def test_models_over_nccl_match_each_sequence_alone(monkeypatch):
    for name, value in MULTICAST_OFF.items():
        monkeypatch.setenv(name, value)  # inherited by the spawned processes
    head_dim, dtype = kernel_config()
    _spawn_ranks(_nccl_worker, 2, head_dim, dtype, "transformers models over NCCL")
