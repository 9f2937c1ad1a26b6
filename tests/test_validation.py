"""Bad input raises the right exception type with a message naming the argument and the rule.
CUDA-only rules are exercised on fake CUDA tensors (metadata only), so they run without a GPU."""
import re

import pytest
import torch

from conftest import fake_cuda_mode
from ring_attn_ext import checks, flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func
from ring_attn_ext._extension import has_extension


def qkv(batch=2, seqlen_q=5, seqlen_k=5, heads=4, heads_kv=4, head_dim=8, dtype=torch.float32, device="cpu"):
    return (torch.randn(batch, seqlen_q, heads, head_dim, dtype=dtype, device=device),
            torch.randn(batch, seqlen_k, heads_kv, head_dim, dtype=dtype, device=device),
            torch.randn(batch, seqlen_k, heads_kv, head_dim, dtype=dtype, device=device))


def call_variant(variant, q, k, v, **kwargs):
    """The same attention through each public entry point (packing k/v or q/k/v as it needs)."""
    if variant == "func":
        return flash_attn_func(q, k, v, **kwargs)
    if variant == "kvpacked":
        return flash_attn_kvpacked_func(q, torch.stack((k, v), dim=2), **kwargs)
    return flash_attn_qkvpacked_func(torch.stack((q, k, v), dim=2), **kwargs)


def raises(exception, message):
    return pytest.raises(exception, match=re.escape(message))


VARIANTS = ["func", "kvpacked", "qkvpacked"]


# ------------------------------------------------------------------------------------- tensor checks

def test_not_a_tensor():
    q, k, v = qkv()
    with raises(TypeError, "q must be a torch.Tensor, got list"):
        flash_attn_func([1.0], k, v)
    with raises(TypeError, "v must be a torch.Tensor, got ndarray"):
        flash_attn_func(q, k, v.numpy())
    with raises(TypeError, "kv must be a torch.Tensor"):
        flash_attn_kvpacked_func(q, (k, v))


@pytest.mark.parametrize("which", [0, 1, 2])
def test_wrong_number_of_dimensions(which):
    tensors = list(qkv())
    tensors[which] = tensors[which][0]
    name = "qkv"[which]
    with raises(ValueError, f"{name} must have 4 dimensions (batch, seqlen, heads, head_dim), got shape"):
        flash_attn_func(*tensors)


@pytest.mark.parametrize("dtype", [torch.int64, torch.float8_e4m3fn, torch.complex64])
def test_dtype_without_a_reference(dtype):
    q, k, v = (t.to(dtype) for t in qkv())
    with raises(TypeError, f"q must be float16, bfloat16, float32 or float64 (the PyTorch reference's dtypes off "
                           f"CUDA), got {dtype}"):
        flash_attn_func(q, k, v)


@pytest.mark.parametrize("which", [1, 2])
def test_mismatched_dtypes(which):
    tensors = list(qkv())
    tensors[which] = tensors[which].double()
    name = "qkv"[which]
    with raises(TypeError, f"{name} must have the dtype of q (torch.float32), got torch.float64"):
        flash_attn_func(*tensors)


def test_mismatched_dtypes_named_in_packed_layouts():
    q, k, v = qkv()
    with raises(TypeError, "kv[:, :, 0] must have the dtype of q (torch.float64)"):
        flash_attn_kvpacked_func(q.double(), torch.stack((k, v), dim=2))


def test_mismatched_shapes():
    q, k, v = qkv()
    with raises(ValueError, "k must have the batch size of q (2), got 3"):
        flash_attn_func(q, *qkv(batch=3)[1:])
    with raises(ValueError, "k must have the head_dim of q (8), got 16"):
        flash_attn_func(q, *qkv(head_dim=16)[1:])
    with raises(ValueError, "v must have the shape of k ((2, 5, 4, 8)), got (2, 6, 4, 8)"):
        flash_attn_func(q, k, qkv(seqlen_k=6)[2])
    with raises(ValueError, "q must have a positive batch size, head count and head_dim"):
        flash_attn_func(*qkv(batch=0))


@pytest.mark.parametrize("heads,heads_kv", [(4, 3), (6, 4), (2, 4)])
def test_heads_must_be_a_multiple_of_kv_heads(heads, heads_kv):
    with raises(ValueError, f"the number of heads of k and v ({heads_kv}) must divide the number of heads of q "
                f"({heads}) (grouped-query attention needs h % h_kv == 0)"):
        flash_attn_func(*qkv(heads=heads, heads_kv=heads_kv))


def test_packed_shapes():
    q, k, v = qkv()
    with raises(ValueError, "kv must have shape (batch, seqlen, 2, heads, head_dim) holding k and v, got shape "
                "(2, 5, 4, 8)"):
        flash_attn_kvpacked_func(q, k)
    with raises(ValueError, "qkv must have shape (batch, seqlen, 3, heads, head_dim) holding q, k and v, got shape "
                "(2, 5, 2, 4, 8)"):
        flash_attn_qkvpacked_func(torch.stack((k, v), dim=2))


# ------------------------------------------------------------------------------------------- options

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dropout_p", [0.1, 1.0])
def test_dropout_is_not_implemented(variant, dropout_p):
    with raises(NotImplementedError, f"dropout_p={dropout_p}: dropout is not supported yet"):
        call_variant(variant, *qkv(), dropout_p=dropout_p)


@pytest.mark.parametrize("dropout_p,exception", [(-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError),
                                                 ("0.1", TypeError), (None, TypeError)])
def test_dropout_p_must_be_a_probability(dropout_p, exception):
    with pytest.raises(exception, match="dropout_p must"):
        flash_attn_func(*qkv(), dropout_p=dropout_p)


@pytest.mark.parametrize("variant", VARIANTS)
def test_alibi_and_softcap_are_not_implemented(variant):
    with raises(NotImplementedError, "alibi_slopes: ALiBi is not supported yet"):
        call_variant(variant, *qkv(), alibi_slopes=torch.ones(4))
    with raises(NotImplementedError, "softcap=30.0: logit soft-capping is not supported yet"):
        call_variant(variant, *qkv(), softcap=30.0)
    with raises(TypeError, "softcap must be a number"):
        call_variant(variant, *qkv(), softcap=None)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("window_size", [(1,), (1, 2, 3), (-2, 0), (0, -5), (1.5, 2), (True, 1), "ab", 4, None])
def test_bad_window_size(variant, window_size):
    with pytest.raises(ValueError, match="window_size"):
        call_variant(variant, *qkv(), window_size=window_size)


@pytest.mark.parametrize("softmax_scale,exception", [(0.0, ValueError), (-1.0, ValueError), (float("inf"), ValueError),
                                                     (float("nan"), ValueError), ("0.5", TypeError),
                                                     (True, TypeError), (torch.tensor(0.5), TypeError)])
def test_bad_softmax_scale(softmax_scale, exception):
    with pytest.raises(exception, match="softmax_scale must"):
        flash_attn_func(*qkv(), softmax_scale=softmax_scale)


def test_integer_softmax_scale_is_accepted():
    q, k, v = qkv()
    torch.testing.assert_close(flash_attn_func(q, k, v, softmax_scale=1), flash_attn_func(q, k, v, softmax_scale=1.0),
                               rtol=0, atol=0)


@pytest.mark.parametrize("name", ["causal", "deterministic", "return_attn_probs"])
@pytest.mark.parametrize("value", [1, "yes", None])
def test_flags_must_be_bools(name, value):
    with raises(TypeError, f"{name} must be a bool, got {value!r}"):
        flash_attn_func(*qkv(), **{name: value})


# -------------------------------------------------------------------------------------------- device

def test_cuda_dtype_must_be_16_bit():
    with fake_cuda_mode():
        tensors = qkv(dtype=torch.float32, device="cuda")
        with raises(TypeError, "q must be float16 or bfloat16 on CUDA (the kernels' dtypes), got torch.float32"):
            flash_attn_func(*tensors)


def test_mismatched_devices():
    with fake_cuda_mode():
        q, k, v = qkv(dtype=torch.bfloat16)
        k_cuda = k.to("cuda")
        with raises(ValueError, "k must be on the device of q (cpu), got cuda:0"):
            flash_attn_func(q, k_cuda, v)
        with raises(ValueError, "v must be on the device of q (cuda:0), got cpu"):
            flash_attn_func(q.to("cuda"), k_cuda, v)


def test_deterministic_is_rejected_on_cuda_and_accepted_on_cpu():
    with fake_cuda_mode():
        tensors = qkv(dtype=torch.bfloat16, head_dim=64, device="cuda")
        with raises(NotImplementedError, "deterministic=True: the CUDA backward is not deterministic yet"):
            flash_attn_func(*tensors, deterministic=True)
    flash_attn_func(*qkv(), deterministic=True)


@pytest.mark.skipif(has_extension(), reason="this install has the extension: CUDA tensors do not fail for lack of it")
def test_cuda_tensors_without_extension_raise_clear_error():
    with fake_cuda_mode():
        tensors = qkv(dtype=torch.bfloat16, head_dim=64, device="cuda")
        with raises(RuntimeError, "flash_attn_func needs the compiled CUDA extension ring_attn_ext._C"):
            flash_attn_func(*tensors)
        with raises(RuntimeError, "flash_attn_qkvpacked_func needs the compiled CUDA extension"):
            flash_attn_qkvpacked_func(torch.stack(tensors, dim=2))


class _ExtensionWithHeadDims:
    def supported_head_dims(self):
        return [64, 128]

    def compiled_kernels(self):  # a build with RING_ATTN_DTYPES=fp16 and RING_ATTN_DISABLE_BACKWARD=1
        return [("fwd", head_dim, "float16", masked) for head_dim in (64, 128) for masked in (False, True)]


def test_cuda_head_dim_must_be_compiled(monkeypatch):
    monkeypatch.setattr(checks, "require_extension", lambda what: _ExtensionWithHeadDims())
    shape = checks.QKVShape(1, 4, 4, 2, 2, 96)
    with raises(ValueError, "head_dim 96 is not supported on CUDA by this build; compiled head dims: [64, 128]"):
        checks.check_device_support(shape, torch.device("cuda"), "flash_attn_func")
    assert isinstance(checks.check_device_support(shape._replace(head_dim=128), torch.device("cuda"), "x"),
                      _ExtensionWithHeadDims)
    assert checks.check_device_support(shape, torch.device("cpu"), "x") is None


def test_cuda_batch_and_heads_must_fit_the_launch_grid(monkeypatch):
    monkeypatch.setattr(checks, "require_extension", lambda what: _ExtensionWithHeadDims())
    shape = checks.QKVShape(65535, 4, 4, 65535, 1, 64)
    assert isinstance(checks.check_device_support(shape, torch.device("cuda"), "x"), _ExtensionWithHeadDims)
    with raises(ValueError, "q's batch size is 65536, but at most 65535 fit a dimension of the CUDA kernels' "
                            "launch grid (flash_attn_func)"):
        checks.check_device_support(shape._replace(batch=65536), torch.device("cuda"), "flash_attn_func")
    with raises(ValueError, "q's number of heads is 65536"):
        checks.check_device_support(shape._replace(heads=65536), torch.device("cuda"), "flash_attn_func")


def test_cpu_accepts_any_head_dim_and_floating_dtype():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        out = flash_attn_func(*qkv(head_dim=5, dtype=dtype))
        assert out.dtype == dtype and out.shape == (2, 5, 4, 5)


# -------------------------------------------------------------------------------- kernel compatibility

def test_kernel_compatible_keeps_tensors_the_kernels_can_read():
    t = torch.randn(2, 5, 4, 64, dtype=torch.bfloat16)
    assert checks.kernel_compatible(t) is t
    view = torch.randn(2, 5, 3, 4, 64, dtype=torch.bfloat16)[:, :, 1]  # a packed slice: 128-byte offset
    assert checks.kernel_compatible(view) is view
    # head_dim 8 in bf16: a head stride of 8 elements is 16 bytes, which is enough (bytes count, not elements).
    assert checks.is_kernel_compatible(torch.randn(1, 3, 2, 8, dtype=torch.bfloat16))
    # Strides of 130 bytes, but every leading size is 1, so no stride is ever stepped over.
    single_row = torch.randn(1, 1, 2, 65, dtype=torch.bfloat16)[:, :, :1, :64]
    assert checks.is_kernel_compatible(single_row)
    assert not checks.is_kernel_compatible(torch.randn(1, 2, 1, 65, dtype=torch.bfloat16)[..., :64])


@pytest.mark.parametrize("what", ["last dim not contiguous", "row stride not a 16-byte multiple",
                                  "misaligned start"])
def test_kernel_compatible_copies_what_the_kernels_cannot_read(what):
    base = torch.randn(2, 5, 4, 64, dtype=torch.bfloat16)
    t = {
        "last dim not contiguous": base.transpose(-1, -2).contiguous().transpose(-1, -2),
        "row stride not a 16-byte multiple": torch.randn(2, 5, 4, 65, dtype=torch.bfloat16)[..., :64],
        "misaligned start": torch.randn(2 * 5 * 4 * 64 + 1, dtype=torch.bfloat16)[1:].view(2, 5, 4, 64),
    }[what]
    assert not checks.is_kernel_compatible(t)
    copy = checks.kernel_compatible(t)
    assert copy is not t and checks.is_kernel_compatible(copy) and copy.is_contiguous()
    assert torch.equal(copy, t)


def test_cuda_dtype_and_direction_must_be_compiled(monkeypatch):
    monkeypatch.setattr(checks, "require_extension", lambda what: _ExtensionWithHeadDims())
    shape = checks.QKVShape(1, 4, 4, 2, 2, 64)
    cuda = torch.device("cuda")
    with raises(ValueError, "this build has no forward kernel for head_dim 64 and dtype torch.bfloat16"):
        checks.check_device_support(shape, cuda, "flash_attn_func", torch.bfloat16, backward=False)
    with raises(ValueError, "this build has no backward kernel for head_dim 64 and dtype torch.float16"):
        checks.check_device_support(shape, cuda, "flash_attn_func", torch.float16, backward=True)
    assert isinstance(checks.check_device_support(shape, cuda, "x", torch.float16, backward=False),
                      _ExtensionWithHeadDims)
