from sdapi.cli import main

raise SystemExit(main())
