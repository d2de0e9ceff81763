from lightning_bigmodel._command import main  # answers --help without importing Lightning

if __name__ == "__main__":
    main()
