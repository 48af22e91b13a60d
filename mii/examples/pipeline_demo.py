"""`make run`: the in-process pipeline on the embedded default model."""
import time

import mii


def main() -> None:
    t0 = time.perf_counter()
    pipe = mii.pipeline()  # SmolLM2-135M-Instruct, converted once into the cache
    print(f"engine ready in {time.perf_counter() - t0:.1f}s on {pipe.engine.device} ({pipe.engine.dtype})")
    chat = pipe.tokenizer.apply_chat_template([{"role": "user", "content": "What is DeepSpeed?"}],
                                              tokenize=False, add_generation_prompt=True)
    prompts = ["Hello, my name is", "DeepSpeed is", chat]
    t0 = time.perf_counter()
    outs = pipe(prompts, max_new_tokens=48, temperature=0.7, top_p=0.9, seed=0, stop=["\n\n"])
    dt = time.perf_counter() - t0
    for o in outs:
        print(f"--- {o.prompt!r}\n{o.generated_text!r}\n({o.finish_reason}, {o.prompt_tokens} prompt + "
              f"{o.generated_tokens} generated tokens)")
    print(f"{sum(o.generated_tokens for o in outs) / dt:.1f} generated tok/s")
    pipe.destroy()


if __name__ == "__main__":
    main()
