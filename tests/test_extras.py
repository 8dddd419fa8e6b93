"""flatmin without its optional extras: it imports and trains, and each integration names the
extra that installs what it misses."""
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import importlib.abc, sys

    class Missing(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("lightning", "transformers", "accelerate", "tensorboard"):
                raise ImportError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, Missing())
    import flatmin, flatmin.cli, flatmin.train, flatmin.integrations
    for module, extra in (("lightning", "lightning"), ("huggingface", "huggingface")):
        try:
            __import__(f"flatmin.integrations.{module}")
        except ImportError as err:
            print(err)
        else:
            print(f"flatmin.integrations.{module} imported without its extra")
    sys.exit(flatmin.cli.main(["train", "--epochs", "1", "--log", "tensorboard", "--out", sys.argv[1]]))
''')


def test_flatmin_imports_without_extras_and_names_what_to_install(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=120)
    out = proc.stdout.splitlines()
    assert out == [
        "flatmin.integrations.lightning needs lightning, which is not installed: pip install 'flatmin[lightning]'",
        "flatmin.integrations.huggingface needs transformers, which is not installed: "
        "pip install 'flatmin[huggingface]'",
    ]
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("flatmin train: error: --log tensorboard needs TensorBoard, which is not "
                                   "installed: pip install 'flatmin[tensorboard]'")


def test_sweep_without_optuna_names_the_extra(tmp_path):
    script = textwrap.dedent('''
        import importlib.abc, sys

        class Missing(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "optuna":
                    raise ImportError(f"No module named {name!r}")
                return None

        sys.meta_path.insert(0, Missing())
        import flatmin.cli
        sys.exit(flatmin.cli.main(["sweep", "--space", "sigma=0.01,0.02", "--methods", "rwp", "--out", sys.argv[1]]))
    ''')
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "sweep")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and not (tmp_path / "sweep").exists()
    assert proc.stderr.strip() == ("flatmin sweep: error: flatmin sweep needs optuna, which is not installed: "
                                   "pip install 'flatmin[sweep]'")
