"""The pass framework: `pass_api` (Pass, PassResult), `options` (option() and the parsing and checking
of option values), `context` (PassContext and the analysis cache, register_analysis), `registry`
(built-in passes and plugins), `pipeline` (pipeline text), `manager` (runs passes, instrumentation)
and `attribution` (errors of third-party passes reported as theirs)."""
