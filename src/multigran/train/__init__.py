"""Training: recipes (`recipe.py`), the Trainer glue (`trainer.py`), losses (`losses.py`), LoRA (`lora.py`) and the
`multigran train` / `multigran merge-lora` commands (`cli.py`).

Nothing is imported here, so that importing one piece (e.g. a method's loss module) stays cheap:
    from multigran.train.recipe import load_recipe
    from multigran.train.trainer import run_training
"""
