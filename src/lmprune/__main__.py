from lmprune.cli import main

if __name__ == "__main__":  # guarded: spawned `prepare` workers import this module
    raise SystemExit(main())
