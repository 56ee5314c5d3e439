"""The stages of an iteration on Ray: generate (vLLM engines), train (Ray Train), evaluate, and the loop that
runs them; what each asks Ray for (`resources`) and lm-eval per iterate (`harness`)."""
