"""Parameter-efficient fine-tuning, built from scratch and checked against PEFT and TRL.

Each module holds the reference implementation of one notebook's idea:

- ``course.models``  base model and tokenizer, found offline (notebook 00)
- ``course.data``    the running task: two-digit addition (notebook 00)
- ``course.train``   a short training loop and plots (notebooks 01, 02)
- ``course.lora``    LoRA layers from scratch, PEFT interop (notebook 02)
- ``course.check``   the exercise checks used in every notebook
"""

import logging
import warnings

__version__ = "0.1.0"

# PEFT 0.21 calls a transformers API that transformers 5 has renamed; the warning says
# nothing a learner can act on, so it is silenced here (and only this one).
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)

#: Where the course is published; used for the Colab badges and the Colab set-up cell.
#: Change it in this one place when you fork the course.
REPO = "peft-course/peft-course"

# bitsandbytes (imported by peft when installed) logs that an optional, hub-fetched CPU kernel
# is missing; its fallback works (notebooks 03, 04, 06 measure it). Quiet that one logger.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
