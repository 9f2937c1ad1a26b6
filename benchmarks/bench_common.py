"""What the benchmark scripts share: finding the package, naming result files after the GPU, and the
metadata every result file carries (so a number can always be traced to its machine and command)."""
import datetime
import json
import os
import re
import socket
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "benchmarks", "results")

# An installed ring_attn_ext wins; the source tree (built in place) is the fallback, appended last so
# it never shadows an installed package that has the compiled extension.
if REPO not in sys.path:
    sys.path.append(REPO)


def parse_size(text):
    """'8192', '8k' or '8K' -> 8192."""
    text = text.strip().lower()
    if text.endswith("k"):
        return int(text[:-1]) * 1024
    return int(text)


def parse_list(text, cast=str):
    return [cast(item) for item in text.split(",") if item.strip()]


def gpu_slug(device_name):
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3': safe in a file name."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


def run_metadata(torch):
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "gpu": props.name,
        "gpu_count": torch.cuda.device_count(),
        "sm_count": props.multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
    }


def command_line():
    """How this process was started, as a command to run again: under torchrun (which leaves only
    the script and its arguments in sys.argv) with its process count in front."""
    command = [os.path.basename(sys.executable)] + sys.argv
    if "LOCAL_WORLD_SIZE" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ:
        command[1:1] = ["-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={os.environ['LOCAL_WORLD_SIZE']}"]
    return " ".join(command)


def write_json(path, document):
    """Writes atomically, so a run killed by a timeout leaves the last complete file behind."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + ".partial"
    with open(partial, "w") as f:
        json.dump(document, f, indent=1)
        f.write("\n")
    os.replace(partial, path)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(local_rank, run, args, world):
    run(args, local_rank, world, local_rank)


def launch(run, args, script):
    """Calls run(args, rank, world_size, local_rank) in every process of a one-host job: in this
    process when torchrun started it, else in args.nproc processes spawned here (0: one per
    visible GPU). `run` must be a module-level function (spawn pickles it by name)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun
        run(args, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
        return
    import torch
    world = args.nproc or torch.cuda.device_count()
    if world < 1:
        sys.exit(f"{script} needs CUDA GPUs")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    torch.multiprocessing.spawn(_spawned, args=(run, args, world), nprocs=world)
