"""The app's tasks: :mod:`lib.infers` (the bundle served with a prompt per request) and :mod:`lib.trainers`
(fine-tuning from the labels saved in the datastore)."""
