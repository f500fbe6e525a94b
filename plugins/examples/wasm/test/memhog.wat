;; Test-only policy plugin: grade grows its memory by 16 MiB at a time until it is stopped.
(module
  (memory (export "memory") 1)
  (func (export "cdt_policy_abi_v1"))
  (func (export "cdt_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "cdt_grade") (param i32 i32) (result i64)
    (loop $l (drop (memory.grow (i32.const 256))) (br $l))
    (i64.const 0)))
