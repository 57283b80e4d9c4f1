"""The documentation: the site builds in strict mode (a broken link, a page missing from the navigation or a
navigation entry without its page fails), the README's links resolve, and the README's Python example runs as
written. (docs/python.md's example is run by tests/test_api.py; docs/config.md's freshness by tests/test_tools.py.)"""
import re
import shutil
import subprocess
import sys

from helpers import REPO, subprocess_env


def test_the_site_builds_in_strict_mode(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "site" / "python" / "index.html").is_file()


def test_a_broken_link_fails_the_strict_build(tmp_path):
    """The check above can fail: the same build over a copy of the docs with one link broken."""
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    page = tmp_path / "docs" / "trl.md"
    page.write_text(page.read_text().replace("(python.md)", "(pyhton.md)", 1))
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode != 0 and "pyhton.md" in out.stderr, out.stderr[-3000:]


def test_the_readme_is_a_front_page_whose_links_resolve():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) < 300
    # the two opening commands come first: the embedded default, then the tests
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert "launch/ppo.py --config configs/tiny.yaml" in blocks[0] and "pytest" in blocks[1]
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert local and all((REPO / link).exists() for link in local), [l for l in local if not (REPO / l).exists()]


def test_the_readme_python_example_runs_as_written(tiny_model_dir, tmp_path):
    """In a folder holding configs/ and the tiny recipe's warm-started model (the warm start is not run again)."""
    code = re.search(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    shutil.copytree(tiny_model_dir, tmp_path / "runs" / "tiny-warm-start")
    (tmp_path / "example.py").write_text(code)
    out = subprocess.run([sys.executable, "example.py"], capture_output=True, text=True, cwd=tmp_path,
                         env=subprocess_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"^\d\.\d+ -> \d\.\d+$", out.stdout, re.M), out.stdout[-2000:]
    assert (tmp_path / "exported" / "model.safetensors").is_file()
