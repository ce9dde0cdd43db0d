"""`python -m lw.run`: compose a config with Hydra, run the job (or, with ``-m``, the sweep).

    python -m lw.run model=minilm data=wiki-vital data.n_prompts=32
    python -m lw.run -m model=smollm2,minilm data=wiki-vital,medical-hpo

The command lives in the sweep layer (``lw.sweep.run``); this module is its name.
"""

from lw.sweep.run import main

if __name__ == "__main__":
    main()
