;; Test-only policy plugin: every hook loops forever. The host must stop it (fuel or deadline).
(module
  (memory (export "memory") 1)
  (func (export "cdt_policy_abi_v1"))
  (func (export "cdt_alloc") (param i32) (result i32) (i32.const 1024))
  (func $spin (param i32 i32) (result i64) (loop $l (br $l)) (i64.const 0))
  (export "cdt_select_runner" (func $spin))
  (export "cdt_admit" (func $spin))
  (export "cdt_grade" (func $spin)))
