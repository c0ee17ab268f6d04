"""Lets zb run on a torch older than the pinned 2.13 for a quick check (put this folder on PYTHONPATH): zb's
microbatch re-trace passes torch.compile(isolate_recompiles=True), an argument older torch lacks; this drops it.
Used to run zb on a lent GPU machine whose installed torch was 2.11 (docs/benchmarks.md). Not for production."""
import importlib.abc
import importlib.util
import sys


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torch")
        loader = spec.loader
        orig_exec = loader.exec_module

        def exec_module(module):
            orig_exec(module)
            compile_ = module.compile

            def compile(*args, isolate_recompiles=None, **kwargs):
                return compile_(*args, **kwargs)

            module.compile = compile

        loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Hook())
