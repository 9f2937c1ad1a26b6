"""The package without its compiled extension (a pure-Python install, or a CPU-only machine): it
imports, reports has_extension() False, runs CPU tensors, and CUDA entry points fail with a clear
RuntimeError. Each test runs in a fresh interpreter whose import system hides ring_attn_ext._C, so
this holds whether or not this checkout has the extension built."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HIDE_EXTENSION = textwrap.dedent("""
    import importlib.abc
    import sys

    class HideExtension(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "ring_attn_ext._C":
                raise ModuleNotFoundError("ring_attn_ext._C hidden by test_packaging", name=name)
            return None

    sys.meta_path.insert(0, HideExtension())
""")


def run_without_extension(code):
    """Runs `code` after hiding the extension; asserts it exits cleanly and returns its stdout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", HIDE_EXTENSION + textwrap.dedent(code)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"subprocess failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_imports_and_reports_missing_extension():
    out = run_without_extension("""
        import ring_attn_ext
        from ring_attn_ext import _extension
        assert ring_attn_ext.has_extension() is False
        assert "hidden by test_packaging" in str(_extension.EXTENSION_ERROR)
        missing = [name for name in ring_attn_ext.__all__ if not hasattr(ring_attn_ext, name)]
        assert not missing, missing
        print("imported", ring_attn_ext.__name__)
    """)
    assert "imported ring_attn_ext" in out


def test_cpu_attention_works_without_extension():
    out = run_without_extension("""
        import torch
        from ring_attn_ext import attention_reference, band_for, flash_attn_func

        q, k, v = (torch.randn(2, 7, 4, 16, requires_grad=True) for _ in range(3))
        out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
        out.sum().backward()
        expected, expected_lse = attention_reference(q, k, v, None, *band_for(7, 7, causal=True))
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        torch.testing.assert_close(lse, expected_lse, rtol=0, atol=0)
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
        print("cpu ok")
    """)
    assert "cpu ok" in out


def test_cuda_entry_point_raises_clear_error_without_extension():
    # Fake CUDA tensors carry a CUDA device without needing a GPU, so this runs on any machine.
    out = run_without_extension("""
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from ring_attn_ext import flash_attn_func, flash_attn_kvpacked_func

        with FakeTensorMode():
            q = torch.empty(1, 16, 4, 128, dtype=torch.bfloat16, device="cuda")
            for call in (lambda: flash_attn_func(q, q, q, causal=True),
                         lambda: flash_attn_kvpacked_func(q, torch.stack((q, q), dim=2))):
                try:
                    call()
                except RuntimeError as error:
                    message = str(error)
                    assert "needs the compiled CUDA extension ring_attn_ext._C" in message, message
                    assert "hidden by test_packaging" in message, message
                    assert "CPU tensors work without it" in message, message
                else:
                    raise AssertionError("CUDA tensors without the extension did not raise")
        print("cuda error ok")
    """)
    assert "cuda error ok" in out
