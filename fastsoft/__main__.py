from fastsoft.cli import main

raise SystemExit(main())
