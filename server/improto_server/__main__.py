from improto_server.cli import main

raise SystemExit(main())
