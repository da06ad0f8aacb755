import sys

from neurond.cli import main

sys.exit(main())
