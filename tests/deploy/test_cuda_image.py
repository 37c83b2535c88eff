"""The CUDA image (deploy/container/Dockerfile.cuda) is the CPU image with torch's CUDA build, checked statically.

No Docker daemon runs where fedtune is tested: the file is parsed with the CPU image's checks
(tests/deploy/test_artifacts.py) and compared with the CPU Dockerfile instruction by instruction,
so the two cannot drift apart on what they copy, install, run as or probe.
"""

from __future__ import annotations

from tests.conftest import REPO
from tests.deploy.test_artifacts import DOCKERFILE, dockerfile_instructions, dockerfile_problems

CUDA_DOCKERFILE = REPO / "deploy" / "container" / "Dockerfile.cuda"
CUDA_CHECK = "torch.version.cuda is None"


def _args(steps: list[tuple[str, str]]) -> dict[str, str]:
    return dict(a.split("=", 1) for i, a in steps if i == "ARG" and "=" in a)


def test_the_cuda_dockerfile_passes_the_cpu_images_checks_but_for_its_torch_index():
    text = CUDA_DOCKERFILE.read_text()
    index = _args(dockerfile_instructions(text))["TORCH_INDEX_URL"]
    assert dockerfile_problems(text, REPO) == [f"TORCH_INDEX_URL {index} is not a CPU index"]
    assert index == "https://pypi.org/simple"  # PyPI's torch for Linux x86_64 is the CUDA build


def test_the_cuda_image_differs_from_the_cpu_image_only_in_torch_and_gpu_access():
    cpu, cuda = dockerfile_instructions(DOCKERFILE.read_text()), dockerfile_instructions(CUDA_DOCKERFILE.read_text())
    assert [i for i, _ in cuda] == [i for i, _ in cpu]
    assert {k: v for k, v in _args(cuda).items() if k != "TORCH_INDEX_URL"} == {
        k: v for k, v in _args(cpu).items() if k != "TORCH_INDEX_URL"
    }
    differing = [(c, g) for c, g in zip(cpu, cuda, strict=True) if c != g and c[0] != "ARG"]
    env_cpu, env_cuda = (dict(a.split("=", 1) for a in step[1].split()) for step in (differing[0][0], differing[0][1]))
    assert {k: v for k, v in env_cuda.items() if k not in env_cpu} == {
        "NVIDIA_VISIBLE_DEVICES": "all",
        "NVIDIA_DRIVER_CAPABILITIES": "compute,utility",
    }
    assert {k: v for k, v in env_cuda.items() if k in env_cpu} == env_cpu
    (run_cpu, run_cuda) = differing[1]
    assert run_cuda[0] == "RUN" and run_cuda[1].replace(f" or {CUDA_CHECK}", "") == run_cpu[1]
    assert len(differing) == 2, differing


def test_the_readme_says_how_to_build_and_run_the_cuda_image():
    readme = (REPO / "README.md").read_text()
    assert "docker build -f deploy/container/Dockerfile.cuda" in readme
    assert "--gpus all" in readme and "CUDA_VISIBLE_DEVICES" in readme
