"""The module graph of fido/, read from the source with `ast` (nothing is imported).

- No import cycle (module-level and function-level imports both count).
- fido/model/ imports only fido.model.*, the config schema (fido.config, fido.errors) and
  third-party packages: nothing of training, data, conversion or config assembly.
- No function-level imports, except ALLOWED_LOCAL: optional heavy dependencies, each with a
  one-line reason as a comment on its import line.
"""

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = REPO / 'fido'
MODEL_MAY_IMPORT = ('fido', 'fido.config', 'fido.errors')  # the package, the config schema
# (module, imported name): imported inside a function on purpose.
ALLOWED_LOCAL = {
    ('fido.bench_reference', 'torch'),          # bench-only reference (requirements-test.txt)
    ('fido.bench_reference', 'transformers'),   # bench-only reference (requirements-test.txt)
    ('fido.bench_reference', 'ctranslate2'),    # bench-only reference (requirements-test.txt)
    ('fido.bench_reference', 'ctranslate2.converters'),  # its T5 converter (as ctranslate2)
}


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))}


def imported_names(node: ast.AST) -> list[str]:
  """The dotted names an import statement loads (`from fido import x` -> 'fido.x' if a module)."""
  if isinstance(node, ast.Import):
    return [alias.name for alias in node.names]
  assert node.level == 0, 'relative imports: none in fido'
  names = [node.module]
  names += [f'{node.module}.{a.name}' for a in node.names if f'{node.module}.{a.name}' in MODULES]
  return names


def imports(path: pathlib.Path) -> list[tuple[str, bool, int]]:
  """(imported dotted name, at function level?, line) of every import in `path`."""
  tree = ast.parse(path.read_text(), str(path))
  found = []

  def visit(node, local):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.Import, ast.ImportFrom)):
        found.extend((name, local, child.lineno) for name in imported_names(child))
      visit(child, local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                               ast.ClassDef, ast.Lambda)))
  visit(tree, False)
  return found


def fido_targets(name: str) -> list[str]:
  """The fido modules that importing `name` runs: it and its parent packages."""
  parts = name.split('.')
  return [m for m in ('.'.join(parts[:i]) for i in range(2, len(parts) + 1)) if m in MODULES]


def graph() -> dict[str, set[str]]:
  return {module: {t for name, _, _ in imports(path) for t in fido_targets(name)} - {module}
          for module, path in MODULES.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
  """One cycle of `edges` as a list of modules (first == last), or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for nxt in sorted(edges.get(node, ())):
      if state.get(nxt) == 'open':
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    stack.pop()
    state[node] = 'done'
    return None

  for node in sorted(edges):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_the_module_graph_has_no_cycle():
  assert find_cycle(graph()) is None, ' -> '.join(find_cycle(graph()))


def test_find_cycle_finds_one():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_the_model_imports_only_the_model_and_the_config_schema():
  wrong = [f'{module} imports {target}'
           for module, path in MODULES.items() if module.startswith('fido.model')
           for name, _, _ in imports(path) for target in fido_targets(name)
           if not (target.startswith('fido.model') or target in MODEL_MAY_IMPORT)]
  assert not wrong, wrong


def test_no_function_level_imports_but_optional_heavy_dependencies():
  local = {(module, name.split('.')[0]): line for module, path in MODULES.items()
           for name, is_local, line in imports(path) if is_local}
  assert set(local) <= ALLOWED_LOCAL, sorted(set(local) - ALLOWED_LOCAL)
  for (module, _), line in local.items():  # each says why, on its line
    assert '#' in MODULES[module].read_text().splitlines()[line - 1], (module, line)
