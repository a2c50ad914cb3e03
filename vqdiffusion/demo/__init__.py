"""The web demo (``vqdiffusion demo``): text to image with every sampling option, inpainting and variations,
in a local Gradio app.  The sampling controls are built from the settings' own fields and metadata
(:class:`~vqdiffusion.sampling.SamplingOptions`, :mod:`vqdiffusion.samplers`); a strategy's own settings
show only while it is the chosen sampler.  A model with micro-conditions (aMUSEd) also gets a control for each
field of :class:`~vqdiffusion.models.uvit_config.MicroConditions`, passed to every tab's pipeline call.

:class:`DemoApp` holds the model and does the work of each tab as plain functions (no Gradio needed: tests
call them directly); :func:`build_demo` lays them out as a ``gradio.Blocks`` page and :func:`launch_demo`
serves it.  Gradio is the optional extra ``pip install "vqdiffusion[demo]"``, imported only here and only
when the page is built.

Bad input (an empty prompt, a value out of range, a missing image or mask) is returned as a message shown
in the page, never a traceback.  Requests are served one at a time: :class:`DemoApp` runs the pipeline under
a lock, each request with its own ``torch.Generator``, so two browser tabs generating at once both get their
own images (the second waits; the time it waited is reported).
"""

from .app import MAX_IMAGES, OPTION_HELP, DemoApp, DemoResult, sampling_settings
from .page import DEFAULT_HOST, DEFAULT_PORT, build_demo, import_gradio, launch_demo

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "MAX_IMAGES",
    "OPTION_HELP",
    "DemoApp",
    "DemoResult",
    "build_demo",
    "import_gradio",
    "launch_demo",
    "sampling_settings",
]
