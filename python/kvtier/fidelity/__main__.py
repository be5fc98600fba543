import sys

from kvtier.fidelity.harness import main

sys.exit(main())
