"""transformers models with ring attention (hf_attention.py) on CUDA: a small Llama with GQA and a
Mistral with a sliding window in the kernels' dtype. Two processes share one GPU over gloo (a packed
stream, each rank feeding its chunk; K/V gathered through host copies), or, on two GPUs, one process
each over NCCL (the packed stream, and two sequences sharded in every ring layout, through the NCCL
ring). The reference runs the same weights on each sequence alone with transformers' SDPA
attention, in float64 (exact) and in the kernels' dtype (the baseline): logits and the parameters'
gradients summed over the ranks, by FlashAttention's rule (at most 2x, for gradients 3x, the
baseline's error against the exact run). Skips without a GPU, the compiled extension or
transformers (4.56 or later here: dtype=)."""
import pytest
import torch
import torch.distributed as dist

from conftest import GRADIENT_EPS, assert_flash_rule, requires_cuda_extension
from test_hf_attention_cpu import VOCAB, packed_batch, small_config, transformers  # skips without transformers
from test_ring_gpu import MULTICAST_OFF, _process_group, _spawn_ranks, kernel_config

import ring_attn_ext

# A stream of 400 tokens over two ranks: sequences of one token, and sequences across the chunk boundary.
BOUNDS = [0, 1, 150, 151, 333, 400]
# The length of each sequence sharded in a ring layout (a multiple of 2 x world size, for zigzag).
SHARDED_LENGTH = 512


def build(arch, head_dim, implementation, dtype, device):
    """The model in `dtype` from construction on, as from_pretrained(dtype=...) loads one: a model
    cast afterwards would also round RoPE's float32 inverse frequencies."""
    config = small_config(arch, head_dim)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=implementation,
                                                         dtype=dtype).to(device)


def models(arch, head_dim, implementation, dtype, device):
    """(ours with `implementation`, {float64: exact reference, dtype: same-dtype reference}), the
    references with SDPA attention and the same (rounded) weights."""
    torch.manual_seed(0)
    ours = build(arch, head_dim, implementation, dtype, device)
    references = {}
    for reference_dtype in (torch.float64, dtype):
        references[reference_dtype] = build(arch, head_dim, "sdpa", reference_dtype, device)
        references[reference_dtype].load_state_dict(ours.state_dict())
    return ours, references


def backward(model, logits, weights):
    """Backward of sum(logits * weights); returns the parameters' gradients summed over the ranks,
    float64 on the CPU (reduced where the group's backend reduces: the host for gloo, the GPU for NCCL)."""
    (logits.double() * weights).sum().backward()
    on_host = dist.get_backend() == "gloo"
    grads = [p.grad.double().cpu() if on_host else p.grad.double() for p in model.parameters()]
    for grad in grads:
        dist.all_reduce(grad)
    return [grad.cpu() for grad in grads]


def reference_run(model, ids, weights, bounds):
    """Logits (float64, CPU) of each sequence [begin, end) of every row run alone, concatenated, and
    the parameters' gradients of sum(logits * weights) (float64, CPU)."""
    logits = torch.cat([model(input_ids=ids[:, begin:end], use_cache=False).logits for begin, end in bounds], dim=1)
    (logits.double() * weights).sum().backward()
    return logits.double().cpu(), [p.grad.double().cpu() for p in model.parameters()]


def assert_matches(what, ours, logits, grads, references, ids, weights, bounds, select, dtype):
    """Our logits and gradients against the exact reference, by FlashAttention's rule with the
    same-dtype reference as the baseline; select: the exact logits of this rank's tokens."""
    exact_logits, exact_grads = reference_run(references[torch.float64], ids, weights, bounds)
    same_logits, same_grads = reference_run(references[dtype], ids, weights, bounds)
    assert_flash_rule(logits.cpu(), select(exact_logits), select(same_logits), 2, f"{what}: logits")
    for (parameter, _), grad, exact, same in zip(ours.named_parameters(), grads, exact_grads, same_grads):
        assert_flash_rule(grad.to(dtype), exact, same.to(dtype), 3, f"{what}: gradient of {parameter}",
                          eps=GRADIENT_EPS)


def _check_packed(rank, world_size, device, arch, head_dim, dtype):
    """The packed stream BOUNDS, this rank's chunk, against each sequence alone."""
    ours, references = models(arch, head_dim, ring_attn_ext.register_hf_attention(), dtype, device)
    ids, positions, weights = (t.to(device) for t in packed_batch(BOUNDS, 11))
    chunk = slice(rank * BOUNDS[-1] // world_size, (rank + 1) * BOUNDS[-1] // world_size)
    ring_attn_ext.update_ring_flash_attn_params(torch.tensor(BOUNDS, dtype=torch.int32, device=device), None)
    logits = ours(input_ids=ids[:, chunk], position_ids=positions[:, chunk], use_cache=False).logits
    grads = backward(ours, logits, weights[:, chunk])
    assert_matches(f"rank {rank}, packed, {arch}, {dtype}, head_dim {head_dim}", ours, logits, grads, references,
                   ids, weights, list(zip(BOUNDS, BOUNDS[1:])), lambda t: t[:, chunk], dtype)


def _check_sharded(rank, world_size, device, arch, layout, head_dim, dtype):
    """Two sequences of SHARDED_LENGTH tokens, this rank's shards in `layout`, against the whole
    sequences."""
    name = ring_attn_ext.register_hf_attention(name=f"ring_attn_ext_{layout}", layout=layout)
    ours, references = models(arch, head_dim, name, dtype, device)
    generator = torch.Generator().manual_seed(13)
    ids = torch.randint(0, VOCAB, (2, SHARDED_LENGTH), generator=generator).to(device)
    weights = torch.randn(2, SHARDED_LENGTH, VOCAB, generator=generator, dtype=torch.float64).to(device)

    def local(t):
        return ring_attn_ext.shard(t, layout, rank, world_size, dim=1)

    positions = ring_attn_ext.positions(SHARDED_LENGTH, layout, rank, world_size, device=device)[None].expand(2, -1)
    logits = ours(input_ids=local(ids), position_ids=positions, use_cache=False).logits
    grads = backward(ours, logits, local(weights))
    assert_matches(f"rank {rank}, {layout}, {arch}, {dtype}, head_dim {head_dim}", ours, logits, grads, references,
                   ids, weights, [(0, SHARDED_LENGTH)], local, dtype)


def _gloo_worker(rank, world_size, init_file, head_dim, dtype):
    """Packed streams only: the ring layouts run the NCCL ring, which takes one GPU per rank."""
    with _process_group("gloo", rank, world_size, init_file) as device:
        for arch in ("llama", "mistral"):
            _check_packed(rank, world_size, device, arch, head_dim, dtype)


def _nccl_worker(rank, world_size, init_file, head_dim, dtype):
    with _process_group("nccl", rank, world_size, init_file) as device:
        for arch in ("llama", "mistral"):
            _check_packed(rank, world_size, device, arch, head_dim, dtype)
            for layout in ring_attn_ext.LAYOUTS:
                _check_sharded(rank, world_size, device, arch, layout, head_dim, dtype)


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
