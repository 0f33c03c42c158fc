import ast, os, sys, json, glob
sys.path.insert(0, "/work/main")
from keras_lora.recipes import data
import numpy, keras, jax, site
roots = [os.path.dirname(m.__file__) for m in (numpy, keras, jax)]
try:
    import scipy; roots.append(os.path.dirname(scipy.__file__))
except ImportError: pass
try:
    import sklearn; roots.append(os.path.dirname(sklearn.__file__))
except ImportError: pass
try:
    import pandas; roots.append(os.path.dirname(pandas.__file__))
except ImportError: pass
docs = []
for root in roots:
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        if "/tests/" in path or "/test_" in path: continue
        try: tree = ast.parse(open(path, encoding="utf-8").read())
        except Exception: continue
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node)
                if d:
                    d = data._clean_docstring(d)
                    if len(d) >= 200: docs.append(d)
docs = list(dict.fromkeys(docs))
print(roots, len(docs), sum(map(len, docs)))
json.dump(docs, open("/tmp/fg/libdocs.json", "w"))
