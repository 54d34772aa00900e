"""The documentation builds with warnings as errors, and its code runs.

* ``test_docs_build``: ``sphinx -W -n`` into a temporary directory, so a broken reference,
  a docstring that does not parse, or a missing page fails the suite;
* ``test_page_snippets``: every ```` ```python ```` block of every page under ``docs/``
  runs, in order, in one namespace per page (a page's blocks build on each other, as a
  reader would paste them). Blocks meant to be read, not run, use another language tag or a
  ``{code-block}`` directive.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

FENCE = re.compile(
    r"^(?P<fence>`{3,}|~{3,})python[ \t]*\n(?P<code>.*?)^(?P=fence)[ \t]*$", re.M | re.S
)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """The ```python blocks of a markdown page, with the line each starts on."""
    return [(text[: m.start()].count("\n") + 2, m.group("code")) for m in FENCE.finditer(text)]


PAGES = sorted(p for p in DOCS.glob("*.md") if python_blocks(p.read_text(encoding="utf-8")))


def test_fence_extraction():
    text = "intro\n```python\na = 1\n```\n\n```bash\nls\n```\n````python\nb = 2\n````\n"
    assert python_blocks(text) == [(3, "a = 1\n"), (10, "b = 2\n")]
    assert PAGES, "no page with python code found"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_snippets(page, monkeypatch, tmp_path):
    pytest.importorskip("flax")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    import jax

    namespace: dict = {"__name__": f"docs_{page.stem}"}
    x64 = jax.config.jax_enable_x64
    try:
        for line, code in python_blocks(page.read_text(encoding="utf-8")):
            # pad so that tracebacks show the line number in the page
            compiled = compile("\n" * (line - 1) + code, str(page), "exec")
            exec(compiled, namespace)
    finally:
        jax.config.update("jax_enable_x64", x64)  # a page may switch precision


def test_docs_build(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
    pytest.importorskip("sphinx_book_theme")
    out = tmp_path / "html"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    proc = subprocess.run(
        [*cmd, str(DOCS), str(out)], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-5000:] + proc.stdout[-2000:]
    pages = ("index", "getting_started", "geometry", "recipes", "results", "api")
    index = (out / "index.html").read_text(encoding="utf-8")
    for page in pages:
        assert (out / f"{page}.html").exists(), page
        assert f'href="{page}.html"' in index or page == "index", page  # navigation
    geometry = (out / "geometry.html").read_text(encoding="utf-8")
    assert geometry.count('class="math') > 20 and "mathjax" in geometry.lower()
    assert (
        "_images/angular_updates.png" in geometry and (out / "_images/angular_updates.png").exists()
    )
    api = (out / "api" / "optax_sphere.html").read_text(encoding="utf-8")
    import optax_sphere

    for name in optax_sphere.__all__:  # every exported name is on the reference page
        assert re.search(rf">(optax_sphere\.)?{name}<", api), name


def _results_tables(monkeypatch):
    pytest.importorskip("sphinx")
    monkeypatch.syspath_prepend(str(DOCS / "_ext"))
    import results_tables

    return results_tables


def test_results_table_rendered_from_json(monkeypatch, tmp_path):
    rt = _results_tables(monkeypatch)
    name, source = next(iter(rt.SOURCES.items()))
    path = tmp_path / source.path
    path.parent.mkdir(parents=True)
    path.write_text('[{"optimizer": "adam", "acc": 0.91234}, {"optimizer": "adam_srt"}]')
    monkeypatch.setitem(rt.SOURCES, name, rt.Source(source.path, source.command, rt.generic))
    text, read = rt.render_source(name, str(tmp_path))
    assert read == str(path)
    assert "| optimizer | acc |" in text and "| adam | 0.9123 |" in text
    assert "| adam_srt |  |" in text and source.command in text


def test_results_table_missing_json_names_the_command(monkeypatch, tmp_path):
    rt = _results_tables(monkeypatch)
    for name, source in rt.SOURCES.items():
        text, read = rt.render_source(name, str(tmp_path))
        assert read is None
        assert source.command in text and source.path in text
        assert "|" not in text  # no table, no numbers


def test_results_renderers_of_the_scripts_layouts(monkeypatch):
    rt = _results_tables(monkeypatch)

    def entry(family, base, acc, vs=None):
        out = {
            "label": "",
            "family": family,
            "base": base,
            "selected_learning_rate": 1e-3,
            "selected_at_grid_end": False,
            "summary": {
                "test_accuracy_mean": acc,
                "test_accuracy_std": 0.01,
                "train_loss_mean": 0.5,
                "diverged_seeds": 0,
            },
        }
        if vs is not None:
            out["versus_base"] = vs
        return out

    vs = {"mean_difference": 0.1, "low": 0.05, "high": 0.15, "verdict": "better"}
    compare = {
        "benchmark": "MNIST-1D",
        "model": "1-D CNN",
        "protocol": {"epochs": 2, "seeds": 2},
        "environment": {"jax": "0.10"},
        "seconds": 120.0,
        "optimizers": {
            "adam": {**entry("Adam", None, 0.8), "label": "adam"},
            "adam_srt": {**entry("Adam", "adam", 0.9, vs), "label": "adam_srt"},
        },
        "claims": [
            {
                "claim": "Adam-SRT beats Adam",
                "source": "Roburin et al. 2022, table 2",
                "optimizer": "adam_srt",
                "compared_with": "adam",
                **vs,
                "reproduced": True,
            }
        ],
        "equilibrium_ratio": {"adamw": {"epoch_2": {"Conv_0/kernel": 2.5}}},
    }
    text = rt.SOURCES["compare"].render(compare)
    assert text.index("`adam`") < text.index("`adam_srt`")  # the base first, then its family
    assert "90.00 ± 1.00" in text and "2 seeds" in text and "2.0 minutes" in text
    assert "+10.00 [+5.00, +15.00]" in text and "better" in text
    claims = rt.SOURCES["claims"].render(compare)
    assert "Adam-SRT beats Adam" in claims and "| yes |" in claims
    assert "Conv_0/kernel" in claims and "2.5" in claims
    row = {
        "tree": "resnet18",
        "alias": "adam_s",
        "baseline": "optax.adam",
        "time_ratio": 1.05,
        "alias_ms": 2.1,
        "baseline_ms": 2.0,
        "state_bytes_ratio": 0.51,
    }
    bench = {"rows": [row], "targets": {"adam_s": {"time": 1.1, "state": 0.55}}}
    text = rt.SOURCES["benchmarks"].render(bench)
    assert "| `adam_s` | `optax.adam` | 1.050 |" in text
    assert "time ≤ 1.1: met" in text and "state ≤ 0.55: met" in text
    # another layout falls back to a plain table of the records, not an error
    assert "| a |" in rt.SOURCES["benchmarks"].render([{"a": 1}])
    peers = {
        "threads": 2,
        "rows": [
            {"peer": "AdamP (clovaai)", "alias": "adamp", "ratio": 0.5, "jax_ms": 50.0,
             "torch_ms": 100.0, "torch": {"torch": "2.9"}},
            {"peer": "SGDG (Cho & Lee)", "alias": "sgdg", "skipped": "no clone at CODE/cho_lee"},
        ],
    }  # fmt: skip
    text = rt.SOURCES["peers"].render(peers)
    assert "| AdamP (clovaai) | `adamp` | 0.50 | 50.0 | 100.0 |" in text
    assert "no clone at CODE/cho_lee" in text


def test_architecture_page_lists_every_module_and_each_alias_where_it_is_defined():
    """docs/architecture.md stays true: every module of the package has a row, and every alias
    and primitive named in a module's row is defined in that module."""
    import importlib
    import pkgutil

    import optax_sphere

    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    rows = {
        m.group(1): m.group(0)
        for m in re.finditer(r"^\| `([\w.]+)`(?:, `([\w.]+)`)? \|.*$", text, re.M)
    }
    listed = set(rows) | set(re.findall(r"^\| `[\w.]+`, `([\w.]+)` \|", text, re.M))
    modules = {m.name for m in pkgutil.iter_modules(optax_sphere.__path__)}
    missing = (
        modules - listed - {"experiments", "theory", "diagnostics", "plots", "gains", "presets"}
    )
    assert not missing, f"modules without a row in docs/architecture.md: {sorted(missing)}"
    for other in ("experiments", "theory", "diagnostics", "plots", "gains", "presets"):
        assert f"`{other}`" in text
    for module, row in rows.items():
        cells = row.split("|")
        if len(cells) < 6:
            continue  # the foundations table: what a module owns, in words
        mod = importlib.import_module(f"optax_sphere.{module}")
        for name in re.findall(r"`(\w+)`", "|".join(cells[3:5])):
            assert name in getattr(mod, "__all__", ()), f"`{name}` is not defined in `{module}`"
