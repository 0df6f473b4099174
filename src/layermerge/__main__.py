import sys

from layermerge.cli import main

sys.exit(main())
