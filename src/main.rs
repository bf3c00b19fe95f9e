fn main() {
    print!("{}", iam_key_operator::crd::crds_yaml().unwrap());
}
