"""The safety policy and its screens, shared by the input stage (:mod:`safety_workers`) and the inference
worker's streaming output rail (:mod:`core.safety.output`): the policy file, the screener (patterns,
exemplar similarity, trained heads), de-obfuscation and the trained classifier artefact."""
