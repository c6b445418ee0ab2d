from keras_dpsgd.privacy import main

raise SystemExit(main())
