from lmprune.cli import main

raise SystemExit(main())
