"""Fine-tuning as a service: the OpenAI fine-tuning API (files, jobs, events, checkpoints) over the
customization pipeline, with every finished adapter served by the same deployment.

    store.py    durable records: files and jobs as MLflow runs (why MLflow: see its docstring)
    files.py    what an uploaded training file must be, line by line
    jobs.py     a job request -> the run's CarryOnConfig; the OpenAI objects; model names
    runner.py   the job itself: a detached Ray actor running carryon_ray.pipeline.customize
"""
