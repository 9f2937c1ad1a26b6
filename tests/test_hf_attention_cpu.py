"""transformers models with ring attention (hf_attention.py) on CPU processes over gloo, float64: a
small Llama with GQA and a Mistral with a sliding window shorter than its sequences. Each rank feeds
its chunk of a packed stream; the reference runs the same weights on each sequence alone with
transformers' SDPA attention. Checked: logits, and parameter gradients summed over the ranks; with
register_hf_attention and with ring-flash-attn's substitute_hf_flash_attn; and the errors (no
packing set, a padding mask, a batch of two), raised on every rank."""
import re
import sys
import types

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")

from ring_attn_ext import register_hf_attention, substitute_hf_flash_attn, update_ring_flash_attn_params  # noqa: E402
import ring_attn_ext  # noqa: E402
from ring_attn_ext import LAYOUTS, hf_attention, shard  # noqa: E402
from ring_workers import RankPool  # noqa: E402
from test_ring_cpu import expect_error  # noqa: E402

ATOL = 1e-11
VOCAB = 61


def small_config(arch, head_dim=8):
    """Two layers, 4 query heads and 2 k/v heads of head_dim; Mistral's sliding window is 5 tokens."""
    common = dict(vocab_size=VOCAB, hidden_size=4 * head_dim, intermediate_size=6 * head_dim, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    return transformers.MistralConfig(sliding_window=5, **common)


def models(arch, implementation):
    """(model with `implementation`, the same weights with SDPA attention), float64. Each has a
    config of its own: from_config sets the implementation on the config it is given."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(small_config(arch), attn_implementation=implementation)
    reference = transformers.AutoModelForCausalLM.from_config(small_config(arch), attn_implementation="sdpa")
    model, reference = model.double(), reference.double()
    reference.load_state_dict(model.state_dict())
    return model, reference


def packed_batch(bounds, seed):
    """Token ids (1, total), position ids restarting at each sequence, and loss weights (1, total, VOCAB)."""
    generator = torch.Generator().manual_seed(seed)
    total = bounds[-1]
    ids = torch.randint(0, VOCAB, (1, total), generator=generator)
    positions = torch.cat([torch.arange(end - begin) for begin, end in zip(bounds, bounds[1:])])[None]
    weights = torch.randn(1, total, VOCAB, generator=generator, dtype=torch.float64)
    return ids, positions, weights


def run_and_compare(rank, world_size, model, reference, bounds, seed, mask_of_ones):
    """This rank's chunk through `model` (its implementation set, the packing updated) against
    `reference` on each sequence alone; returns (max logit error, max gradient error).
    mask_of_ones: pass the attention_mask of ones a tokenizer gives (it masks nothing), else None."""
    ids, positions, weights = packed_batch(bounds, seed)
    chunk = slice(rank * bounds[-1] // world_size, (rank + 1) * bounds[-1] // world_size)
    mask = torch.ones(1, chunk.stop - chunk.start, dtype=torch.long) if mask_of_ones else None
    logits = model(input_ids=ids[:, chunk], position_ids=positions[:, chunk], attention_mask=mask,
                   use_cache=False).logits
    (logits * weights[:, chunk]).sum().backward()
    for parameter in model.parameters():
        dist.all_reduce(parameter.grad)

    expected = torch.cat([reference(input_ids=ids[:, begin:end], use_cache=False).logits
                          for begin, end in zip(bounds, bounds[1:])], dim=1)
    (expected * weights).sum().backward()
    logit_error = (logits - expected[:, chunk]).abs().max().item()
    gradient_error = max((p.grad - r.grad).abs().max().item()
                         for p, r in zip(model.parameters(), reference.parameters()))
    return logit_error, gradient_error


def body_registered(rank, world_size, arch, bounds, heads_k_stride, seed):
    name = register_hf_attention(heads_k_stride=heads_k_stride)
    model, reference = models(arch, name)
    update_ring_flash_attn_params(torch.tensor(bounds, dtype=torch.int32), None)
    return run_and_compare(rank, world_size, model, reference, bounds, seed, mask_of_ones=heads_k_stride == 1)


def body_substituted(rank, world_size, bounds, seed):
    """ring-flash-attn's adapter: a model set to "flash_attention_2" runs ring attention (the
    implementation is set on the config directly: loading it by name checks that flash-attn is
    installed, which it is not here)."""
    registry = transformers.AttentionInterface._global_mapping
    original = registry["flash_attention_2"]
    try:
        substitute_hf_flash_attn(dist.group.WORLD, 1)
        model, reference = models("llama", "sdpa")
        model.config._attn_implementation = "flash_attention_2"
        update_ring_flash_attn_params(torch.tensor(bounds, dtype=torch.int64), dist.group.WORLD)
        return run_and_compare(rank, world_size, model, reference, bounds, seed, mask_of_ones=True)
    finally:
        registry["flash_attention_2"] = original


@pytest.fixture(scope="module")
def pool(request):
    ranks = RankPool(request.param)
    yield ranks
    ranks.close()


# Sequences of one token, sequences that cross chunk boundaries, one over several chunks.
BOUNDS = {2: [0, 1, 9, 10, 23, 24], 3: [0, 14, 15, 16, 27, 30]}


@pytest.mark.parametrize("pool", [2, 3], indirect=True)
@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("heads_k_stride", [None, 1])
def test_registered_attention_matches_each_sequence_alone(pool, arch, heads_k_stride):
    for logit_error, gradient_error in pool.run(body_registered, arch, BOUNDS[pool.world_size], heads_k_stride, 7):
        assert logit_error <= ATOL and gradient_error <= ATOL, (logit_error, gradient_error)


@pytest.mark.parametrize("pool", [2], indirect=True)
def test_substituted_flash_attention_matches_each_sequence_alone(pool):
    for logit_error, gradient_error in pool.run(body_substituted, BOUNDS[2], 8):
        assert logit_error <= ATOL and gradient_error <= ATOL, (logit_error, gradient_error)


def body_sharded(rank, world_size, arch, layout, seed):
    """A batch of two sequences of 24 tokens, each rank feeding its shards in `layout` with their
    global positions, against the reference on the whole sequences; returns (max logit error, max
    gradient error)."""
    name = register_hf_attention(name=f"ring_attn_ext_{layout}", layout=layout)
    model, reference = models(arch, name)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 24), generator=generator)
    weights = torch.randn(2, 24, VOCAB, generator=generator, dtype=torch.float64)

    def local(t):
        return shard(t, layout, rank, world_size, dim=1)

    positions = ring_attn_ext.positions(24, layout, rank, world_size)[None].expand(2, -1)
    logits = model(input_ids=local(ids), position_ids=positions, use_cache=False).logits
    (logits * local(weights)).sum().backward()
    for parameter in model.parameters():
        dist.all_reduce(parameter.grad)
    expected = reference(input_ids=ids, use_cache=False).logits
    (expected * weights).sum().backward()
    gradient_error = max((p.grad - r.grad).abs().max().item()
                         for p, r in zip(model.parameters(), reference.parameters()))
    return (logits - local(expected)).abs().max().item(), gradient_error


@pytest.mark.parametrize("pool", [2, 3], indirect=True)
@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sharded_sequences_match_the_whole_sequences(pool, arch, layout):
    for logit_error, gradient_error in pool.run(body_sharded, arch, layout, 12):
        assert logit_error <= ATOL and gradient_error <= ATOL, (logit_error, gradient_error)


def test_registration_checks_the_layout_and_its_options():
    with pytest.raises(ValueError, match="layout must be one of"):
        register_hf_attention(layout="diagonal")
    with pytest.raises(ValueError, match="heads_k_stride: applies to the packed stream"):
        register_hf_attention(heads_k_stride=2, layout="zigzag")


def body_error(rank, world_size, case, errors):
    """Runs a forward that `case` makes fail; errors: {rank: (error type, fragment)} or one pair for all."""
    name = register_hf_attention()
    model, _ = models("llama", name)
    ids, positions, _ = packed_batch(BOUNDS[2], 9)
    chunk = slice(rank * 12, (rank + 1) * 12)
    update_ring_flash_attn_params(torch.tensor(BOUNDS[2]), None)
    mask = None
    if case == "no packing" or (case == "no packing on rank 1" and rank == 1):
        hf_attention._PACKINGS.clear()
    elif case == "another packing on rank 1" and rank == 1:
        update_ring_flash_attn_params(torch.tensor([0, 2, 9, 10, 23, 24]), None)  # same length, one cut moved
    elif case == "padding mask":
        mask = torch.ones(1, 12, dtype=torch.long)
        mask[0, -2:] = 0
    elif case == "a longer batch":  # the packing of a stream of 2 x 12 tokens, a batch of 2 x 16
        ids, positions, _ = packed_batch([0, 5, 20, 32], 9)
        chunk = slice(rank * 16, (rank + 1) * 16)
    batch = 2 if case == "batch of two" else 1
    error_type, fragment = errors[rank] if isinstance(errors, dict) else errors
    expect_error(error_type, fragment, lambda: model(input_ids=ids[:, chunk].expand(batch, -1),
                                                     position_ids=positions[:, chunk].expand(batch, -1),
                                                     attention_mask=mask, use_cache=False))


REJECTED = "ring attention in a transformers model: rank(s) [1] of the process group rejected their arguments"


@pytest.mark.parametrize("pool", [2], indirect=True)
@pytest.mark.parametrize("case, errors", [
    ("no packing", (RuntimeError, "call ring_attn_ext.update_ring_flash_attn_params(cu_seqlens, process_group)")),
    ("no packing on rank 1", {0: (ValueError, REJECTED), 1: (RuntimeError, "update_ring_flash_attn_params")}),
    ("another packing on rank 1", (ValueError, "the ranks of the process group disagree on cu_seqlens")),
    ("padding mask", (ValueError, "attention_mask: ring attention in a transformers model takes no padding mask")),
    ("batch of two", (ValueError, "query: ring attention over a packed stream takes a batch of one")),
    ("a longer batch", (ValueError, "query holds 16 tokens, but the packing that update_ring_flash_attn_params "
                                    "set gives each rank 12")),
])
def test_errors_name_the_rule_on_every_rank(pool, case, errors):
    pool.run(body_error, case, errors)


@pytest.mark.parametrize("module_causal, is_causal, expected", [
    (True, None, True), (True, False, False), (False, None, False), (False, True, True)])
def test_a_layer_call_overrides_the_module_causal_flag(module_causal, is_causal, expected):
    """transformers passes is_causal per call (None: the module's own flag); a world of one."""
    attend = hf_attention._attention_function(None, None, "ring")
    generator = torch.Generator().manual_seed(4)
    query, key, value = (torch.randn(1, 4, 6, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    out, _ = attend(types.SimpleNamespace(is_causal=module_causal), query, key, value, None, is_causal=is_causal)
    exact, _ = ring_attn_ext.attention_reference(*(t.transpose(1, 2) for t in (query, key, value)), None,
                                                 *ring_attn_ext.band_for(6, 6, expected))
    assert (out - exact).abs().max() <= 1e-12


def test_float32_cuda_activations_run_in_the_dtype_of_the_weights():
    """As transformers' FlashAttention integration does for layer norms kept in float32 (the
    decision alone: a stand-in for a CUDA tensor, since this machine may have no GPU)."""
    module = torch.nn.Sequential(torch.nn.Linear(4, 4).to(torch.bfloat16))
    cuda_float32 = types.SimpleNamespace(dtype=torch.float32, is_cuda=True)
    assert hf_attention._kernel_dtype(cuda_float32, module) == torch.bfloat16
    assert hf_attention._kernel_dtype(torch.zeros(1), module) == torch.float32  # CPU: the reference takes it


def test_float32_cuda_activations_under_autocast_run_in_the_autocast_dtype(monkeypatch):
    module = torch.nn.Sequential(torch.nn.Linear(4, 4).to(torch.bfloat16))
    cuda_float32 = types.SimpleNamespace(dtype=torch.float32, is_cuda=True)
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *device: device == ("cuda",))
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda device: torch.float16)
    assert hf_attention._kernel_dtype(cuda_float32, module) == torch.float16


def test_update_prepares_and_checks_the_packing_in_one_process():
    """Without torch.distributed a world of one holds the whole stream; bad cu_seqlens fail at the
    update, not at a later forward."""
    update_ring_flash_attn_params(torch.tensor([0, 3, 7], dtype=torch.int32))
    assert hf_attention._PACKINGS[None].prepared[True][4] == slice(0, 7)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        update_ring_flash_attn_params(torch.tensor([1, 7], dtype=torch.int32))


def test_registration_without_transformers_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now fails as if not installed
    with pytest.raises(ImportError, match=re.escape("pip install 'transformers>=4.53'")):
        register_hf_attention()
