"""The package's import graph: no module imports itself back through others (an import circle), counting the
imports inside functions, which hide circles from Python until one of them runs first."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llmrl"


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, for every import statement anywhere in the module."""
    files = {module_name(p, package): p for p in sorted(package.rglob("*.py"))}
    graph = {name: set() for name in files}
    for name, path in files.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from .x import y, from .. import z
                    base = here.split(".")[:len(here.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module
                targets = [module, *(f"{module}.{a.name}" for a in node.names)]  # a name may be a submodule
            else:
                continue
            for target in targets:
                while target and target not in files:  # llmrl.rl.ops.masked_mean -> llmrl.rl.ops
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, circles = {}, {}, set(), [], []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        circles.append(sorted(component))
    return circles


def test_the_circle_finder_on_hand_built_graphs():
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert import_circles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    # two circles joined by a one-way edge stay two: {a, b, c} and {d, e}
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": {"d"}}
    assert sorted(import_circles(graph)) == [["a", "b", "c"], ["d", "e"]]


def test_the_graph_reads_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "llmrl"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from llmrl.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from ..a import f\nimport torch\n")
    graph = import_graph(pkg)
    assert graph["llmrl.a"] == {"llmrl.sub", "llmrl.sub.b"} and graph["llmrl.sub.b"] == {"llmrl.a"}
    assert import_circles(graph) == [["llmrl.a", "llmrl.sub.b"]]


def test_llmrl_has_no_import_circles():
    graph = import_graph(PACKAGE)
    assert len(graph) > 20  # the whole package was read
    circles = import_circles(graph)
    assert circles == [], "import circles: " + "; ".join(
        " <-> ".join(f"{m} (imports {sorted(graph[m] & set(c))})" for m in c) for c in circles)


def part_of(module: str) -> str:
    """'cli' (commands and console helpers), 'api' (``llmrl.api``: the run a Python program or a command starts),
    'tune' (search and population-based training, which start runs), 'demo' (the embedded default's tiny model and
    warm start) or 'library' (the parts a run is built from)."""
    if module == "llmrl.__main__" or module == "llmrl.cli" or module.startswith("llmrl.cli."):
        return "cli"
    if module == "llmrl.api":
        return "api"
    if module == "llmrl.tune" or module.startswith("llmrl.tune."):
        return "tune"  # search and population-based training: they start runs (llmrl.api) as a program would
    if module == "llmrl.demo" or module.startswith("llmrl.demo."):
        return "demo"
    return "library"


# library < demo < api < tune < cli: a part imports only those below it (and itself)
ALLOWED = {"cli": {"cli", "tune", "api", "demo", "library"}, "tune": {"tune", "api", "demo", "library"},
           "api": {"api", "demo", "library"}, "demo": {"demo", "library"}, "library": {"library"}}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports that point up the layers: the library importing a command or the demo, the demo a command."""
    return sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                  if part_of(t) not in ALLOWED[part_of(m)])


def test_the_layer_check_on_a_hand_built_graph():
    graph = {"llmrl.cli.train": {"llmrl.demo.tiny", "llmrl.config"}, "llmrl.demo.tiny": {"llmrl.config"},
             "llmrl.config": set(), "llmrl.trainers.reward": {"llmrl.demo.tiny"}, "llmrl.demo.x": {"llmrl.cli"},
             "llmrl.api": {"llmrl.demo.tiny", "llmrl.cli.console"}, "llmrl.trainers.base": {"llmrl.api"}}
    assert layer_violations(graph) == ["llmrl.api -> llmrl.cli.console", "llmrl.demo.x -> llmrl.cli",
                                       "llmrl.trainers.base -> llmrl.api", "llmrl.trainers.reward -> llmrl.demo.tiny"]


def test_the_library_imports_no_command_and_no_demo_module():
    graph = import_graph(PACKAGE)
    assert {part_of(m) for m in graph} == {"cli", "tune", "api", "demo", "library"}
    assert layer_violations(graph) == []


# The library's layers, lowest first: a module imports only its own layer and those below. The RL maths (rl)
# needs only torch; algorithms combine it; config names the algorithms; the parts a run is built from (data,
# models, rollout, rewards, environments, checkpoints and run folders, logging, trust rules) sit on config;
# trainers and the exporter assemble parts; the embedded default's demo uses parts; the Python API (api) runs a
# run from them; a search or a population (tune) runs its trials through the API; the command line (cli) parses
# arguments and calls the API.
LAYERS = [
    {"llmrl", "llmrl.errors", "llmrl.user_functions"},
    {"llmrl.rl"},
    {"llmrl.algorithms"},
    {"llmrl.config"},
    {"llmrl.data", "llmrl.models", "llmrl.rollout", "llmrl.rewards", "llmrl.envs", "llmrl.distributed",
     "llmrl.tracking", "llmrl.trust", "llmrl.packages"},
    {"llmrl.trainers", "llmrl.exporter"},
    {"llmrl.demo"},
    {"llmrl.api"},
    {"llmrl.tune"},
    {"llmrl.cli", "llmrl.__main__"},
]
# Within a layer, what may not import what: the decode loop uses the model helpers, never the other way round.
FORBIDDEN = {("llmrl.models", "llmrl.rollout")}


def layer_of(module: str) -> tuple[int, str]:
    """(the layer's index in LAYERS, the top-level part: llmrl.models.policy -> llmrl.models)."""
    part = ".".join(module.split(".")[:2])
    for i, layer in enumerate(LAYERS):
        if part in layer:
            return i, part
    raise AssertionError(f"{module} is in no layer: add {part} to LAYERS")


def order_violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for m, targets in graph.items():
        (lm, pm) = layer_of(m)
        for t in targets:
            (lt, pt) = layer_of(t)
            if lt > lm or (pm, pt) in FORBIDDEN:
                found.append(f"{m} -> {t}")
    return sorted(found)


def test_the_order_check_on_a_hand_built_graph():
    graph = {"llmrl.rl.ops": {"llmrl.config"}, "llmrl.config": {"llmrl.algorithms"},
             "llmrl.models.policy": {"llmrl.rollout.engine"}, "llmrl.rollout.engine": {"llmrl.models.forward"},
             "llmrl.models.forward": set(), "llmrl.trainers.base": {"llmrl.api"}, "llmrl.api": {"llmrl.trainers.base"},
             "llmrl.algorithms": {"llmrl.rl"}, "llmrl.rl": set()}
    assert order_violations(graph) == ["llmrl.models.policy -> llmrl.rollout.engine", "llmrl.rl.ops -> llmrl.config",
                                       "llmrl.trainers.base -> llmrl.api"]


def test_the_library_keeps_its_layer_order():
    graph = import_graph(PACKAGE)
    assert order_violations(graph) == []
