import sys

from rome_edit.cli.main import main

sys.exit(main())
