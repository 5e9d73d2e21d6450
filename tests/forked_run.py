"""A fork server for tests/test_cli.py: `run.py` command lines at the cost of one import.

Importing fido's modules (JAX, Haiku, Optax, Orbax) takes seconds; the CLI tests run some forty
command lines. This process imports them once, without starting a JAX backend, then runs each
request (one JSON line on stdin: {"argv": [...], "stdout": path, "stderr": path, "env": {...}})
as `python run.py ARGV` in a forked child, and answers one JSON line {"status": exit status}.
"""

import json
import os
import runpy
import sys
import traceback

# The slow imports, once, for every child.
from fido import analyze, bench, cli, compile_time, convert_fido, eval_checkpoint, sweep, train  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_forked(argv: list[str], stdout: str, stderr: str, env: dict[str, str]) -> int:
  pid = os.fork()
  if pid == 0:  # the child: becomes `python run.py ARGV`
    status = 1
    try:
      os.dup2(os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
      os.dup2(os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
      os.environ.update(env)
      os.chdir(REPO)
      sys.argv = ['run.py', *argv]
      runpy.run_path('run.py', run_name='__main__')
      status = 0
    except SystemExit as e:
      if isinstance(e.code, str):
        print(e.code, file=sys.stderr)
      status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # pylint: disable=broad-except
      traceback.print_exc()
    finally:
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(status)  # pylint: disable=protected-access
  _, wait_status = os.waitpid(pid, 0)
  return os.waitstatus_to_exitcode(wait_status)


def main() -> None:
  for line in sys.stdin:
    request = json.loads(line)
    status = run_forked(request['argv'], request['stdout'], request['stderr'],
                        request.get('env', {}))
    print(json.dumps({'status': status}), flush=True)


if __name__ == '__main__':
  main()
