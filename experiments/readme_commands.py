"""Runs every ``python -m jaxnas.main`` command of README.md as printed, so none of them rots.

Each command runs in a fresh working directory (its default workdir lands there) with a
wall-time limit, and the script records exit status, seconds and the last line of stderr
per command in a JSON file. tests/test_readme.py checks in CI that every command still
parses and validates; this script is the slow, complete check (a few of the commands
train networks for many minutes on a 2-core CPU).

  python experiments/readme_commands.py --timeout=3600 --out=experiments/results/readme_commands.json
  python experiments/readme_commands.py --only=darts   # commands matching a regex
  python experiments/readme_commands.py --skip='darts|retrain|evaluator=train'
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands(path: str = os.path.join(ROOT, "README.md")) -> list[list[str]]:
  """The argument lists (after ``-m jaxnas.main``) of the README's bash blocks' commands,
  continuation lines joined and trailing comments dropped."""
  with open(path) as f:
    text = f.read()
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    for line in block.replace("\\\n", " ").splitlines():
      words = shlex.split(line, comments=True)
      for i, w in enumerate(words):
        if w == "jaxnas.main" and i > 0 and words[i - 1] == "-m":
          args = words[i + 1:]
          if "&&" in args:
            args = args[:args.index("&&")]
          commands.append(args)
  return commands


# The module the README's ``--model`` commands name: its "Bring your own model" example.
BYO_MODULE = "my_models"


def byo_module_source(path: str = os.path.join(ROOT, "README.md")) -> str:
  """The README's "Bring your own model" example down to its ``model = ...`` line, the
  ``my_models.py`` its ``--model=my_models:model`` commands import."""
  with open(path) as f:
    text = f.read()
  section = text[text.index("## Bring your own model"):]
  code = section[section.index("```python\n") + len("```python\n"):section.index("\n```\n")]
  lines = code.splitlines()
  end = next(i for i, line in enumerate(lines) if line.startswith("model = "))
  return "\n".join(lines[:end + 1]) + "\n"


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per command")
  parser.add_argument("--only", default="", help="run only commands matching this regex")
  parser.add_argument("--skip", default=None, help="skip commands matching this regex")
  parser.add_argument("--out", default=None, help="JSON file of the outcomes")
  a = parser.parse_args()
  outcomes = []
  for args in readme_commands():
    line = " ".join(shlex.quote(x) for x in ["python", "-m", "jaxnas.main", *args])
    if not re.search(a.only, line) or (a.skip and re.search(a.skip, line)):
      continue
    with tempfile.TemporaryDirectory() as cwd:
      with open(os.path.join(cwd, f"{BYO_MODULE}.py"), "w") as f:
        f.write(byo_module_source())
      t0 = time.time()
      try:
        proc = subprocess.run([sys.executable, "-m", "jaxnas.main", *args], cwd=cwd,
                              capture_output=True, text=True, timeout=a.timeout)
        status, tail = proc.returncode, (proc.stderr.strip().splitlines() or [""])[-1]
        summary = proc.stdout.strip().splitlines()[:3]
      except subprocess.TimeoutExpired:
        status, tail, summary = "timeout", f"still running after {a.timeout:.0f} s", []
    outcome = {"command": line, "status": status, "seconds": round(time.time() - t0, 1),
               "stderr_tail": tail[:300], "stdout_head": summary}
    print(json.dumps(outcome), flush=True)
    outcomes.append(outcome)
  if a.out:
    with open(a.out, "w") as f:
      json.dump({"python": sys.version.split()[0], "cpus": os.cpu_count(),
                 "outcomes": outcomes}, f, indent=1)
  return 0 if all(o["status"] == 0 for o in outcomes) else 1


if __name__ == "__main__":
  sys.exit(main())
