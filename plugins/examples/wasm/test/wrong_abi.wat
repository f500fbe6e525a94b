;; Test-only policy plugin written for a future ABI (v2): the host must refuse it at load.
(module
  (memory (export "memory") 1)
  (func (export "cdt_policy_abi_v2"))
  (func (export "cdt_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "cdt_grade") (param i32 i32) (result i64) (i64.const 0)))
